"""Tiny teacher / compressed-student pairs for the recovery tests (a module name of its own)."""

from __future__ import annotations

import copy

import torch


def tiny_teacher(layers: int = 2, seed: int = 0, vocab: int = 96, hidden: int = 64, ffn: int = 128):
    """A random tiny Llama-layout graph whose next-token distributions are far from uniform."""
    from transformers import LlamaConfig

    from llmcompress.models import build
    from llmcompress.models.loading import config_from_hf

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    graph = build(config_from_hf(cfg))
    with torch.no_grad():
        graph.lm_head.weight.mul_(20)  # logits of order 1, not 0.05
        for name, p in graph.model.layers.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(4)  # layers that matter, so that damaging them shows in the logits
    return graph


def compressed_student(teacher, sparse: bool = True, group_size: int = 32, symmetric: bool = True):
    """A copy of teacher pruned 2:4 (magnitude) and/or quantized int4 (RTN): a damaged model to recover."""
    from llmcompress.oneshot import PruneConfig, QuantizeConfig, prune_model, quantize_model

    student = copy.deepcopy(teacher)
    if sparse:
        prune_model(student, None, PruneConfig(method="magnitude"))
    if group_size:
        quantize_model(student, None, QuantizeConfig(method="rtn", group_size=group_size, symmetric=symmetric))
    return student


def tokens(n: int = 8, s: int = 16, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
