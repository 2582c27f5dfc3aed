"""oneDNN linears with weights reordered once (`llmcompress.models.cpu_linear`) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcompress.models.cpu_linear import (PackedLinear, onednn_available, pack_weight, packed_linear,
                                           packed_linears, resolve)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build's oneDNN linear ops do not run here")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("shape", [(64, 32), (192, 576), (7, 13)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, shape, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)  # [N, K]
    b = torch.randn(shape[0], generator=g) if bias else None
    x = torch.randn(rows, shape[1], generator=g)  # [R, K]
    ref = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    y = packed_linear(x, pack_weight(w), shape[0], b)
    assert y.shape == (rows, shape[0])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    # a [B, S, K] input, non-contiguous
    x3 = torch.randn(shape[1], 2, rows, generator=g).permute(1, 2, 0)  # [2, R, K]
    torch.testing.assert_close(packed_linear(x3, pack_weight(w), shape[0], b), F.linear(x3, w, b), rtol=1e-5, atol=1e-4)


def test_pack_weight_refuses_what_onednn_cannot_take():
    with pytest.raises(ValueError, match="float32 CPU"):
        pack_weight(torch.ones(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        pack_weight(torch.ones(4))


def test_resolve():
    assert resolve("torch", "cpu") is False
    assert resolve("auto", "meta") is False  # not a CPU model: F.linear
    assert resolve("auto", "cpu") is onednn_available()
    with pytest.raises(ValueError, match="needs a CPU model"):
        resolve("onednn", "meta")
    with pytest.raises(ValueError, match="choose auto, onednn or torch"):
        resolve("mkl", "cpu")


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.body = nn.Sequential(nn.Linear(16, 24), nn.SiLU(), nn.Linear(24, 16, bias=False))
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight
        self.fp16 = nn.Linear(16, 16).half()  # not packable: stays as it is

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


@needs_onednn
def test_packed_linears_swaps_and_restores():
    torch.manual_seed(0)
    m = _Tied()
    ids = torch.tensor([[1, 5, 7, 9]])
    ref = m(ids)
    originals = [m.body[0], m.body[2], m.head, m.fp16]
    keys = set(m.state_dict())
    with torch.no_grad(), packed_linears(m) as n:
        assert n == 3  # body[0], body[2] and the head (its weight is the embedding's)
        assert all(isinstance(x, PackedLinear) for x in (m.body[0], m.body[2], m.head))
        assert m.head.weight is m.embed.weight and type(m.fp16) is nn.Linear
        assert set(m.state_dict()) == keys  # packed copies are not state
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
    assert [m.body[0], m.body[2], m.head, m.fp16] == originals
    with packed_linears(m):  # grad enabled and trainable weights: F.linear, so gradients flow
        m(ids).sum().backward()
    assert m.body[0].weight.grad is not None and m.embed.weight.grad is not None
    with pytest.raises(RuntimeError, match="boom"), packed_linears(m):
        raise RuntimeError("boom")
    assert [m.body[0], m.body[2], m.head, m.fp16] == originals  # restored after an error too
    with packed_linears(m, enabled=False) as n:
        assert n == 0 and m.head is originals[2]


@needs_onednn
def test_packed_linears_covers_a_subset_head(tiny_hf_dir):
    from llmcompress.models import load
    from llmcompress.speculative.vocab import SubsetHead, restrict_vocab

    model = load(str(tiny_hf_dir))
    restrict_vocab(model, torch.arange(0, 200, 3))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = model(ids).logits
        with packed_linears(model):
            assert isinstance(model.lm_head, SubsetHead) and model.lm_head.packed is not None
            assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
            out = model(ids).logits
    assert model.lm_head.packed is None and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
