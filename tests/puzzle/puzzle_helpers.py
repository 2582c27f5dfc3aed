"""Tiny parents and tokens for the Puzzle tests (a module name of its own: several conftest.py files exist)."""

from __future__ import annotations

import torch

from llmcompress.models import LlmcNasConfig, build
from llmcompress.oneshot.hessian import serial_on_cpu
from llmcompress.puzzle import BLDConfig


def tiny_parent(layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build(LlmcNasConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=256))


def tiny_tokens(n: int, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))  # [N, S]


BLD = BLDConfig(tokens=384, num_samples=8, eval_samples=2, batch_size=4, lr=2e-3)


def one_thread():
    """Tiny models on a shared CPU: one thread is much faster than several competing ones."""
    return serial_on_cpu(torch.device("cpu"))
