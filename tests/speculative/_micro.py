"""Very small random decoders for the speculative-decoding tests (a module name of its own)."""

from __future__ import annotations

import torch

from llmcompress.models import LlmcNasConfig, build


def micro_model(vocab: int = 6, layers: int = 2, seed: int = 0, scale: float = 8.0, hidden: int = 32):
    """A random decoder over a `vocab`-token alphabet whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    cfg = LlmcNasConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=48, num_hidden_layers=layers, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    g = build(cfg)
    with torch.no_grad():
        g.lm_head.weight.mul_(scale)  # logits of order 1, not 0.01
    return g
