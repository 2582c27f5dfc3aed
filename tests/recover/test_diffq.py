"""Differentiable quantization: learnable levels per group, re-fitted to the uniform int4 grid on export."""

import pytest
import torch
from torch import nn

from llmcompress.formats import QuantLinear
from llmcompress.recover import DiffQuantLinear, FakeQuantLinear, sparse24_keep


def _fake(fmt="int4", group=32, symmetric=True):
    torch.manual_seed(0)
    return FakeQuantLinear.from_linear(nn.Linear(128, 32, bias=False), fmt, group, symmetric)


def _train(mod, steps=40, lr=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, mod.in_features, generator=g)
    a = mod.weight.abs().max()
    target = x @ (1.5 * a * torch.tanh(mod.weight / a)).T  # a monotone warp of the weights: new levels reach it
    opt = torch.optim.AdamW([mod.levels], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = (mod(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_starts_on_the_uniform_grid(symmetric):
    fake = _fake(symmetric=symmetric)
    dq = DiffQuantLinear(fake)
    torch.testing.assert_close(dq.quant_weight(), fake.quant_weight(), rtol=0, atol=1e-6)
    assert dq.levels.shape == (32, 128 // 32, 16)


@pytest.mark.parametrize("soft", [None, 0.5], ids=["hard", "soft"])
def test_levels_learn_and_weights_stay(soft):
    dq = DiffQuantLinear(_fake(), soft_temperature=soft)
    w, levels = dq.weight.clone(), dq.levels.detach().clone()
    losses = _train(dq)
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(dq.weight, w) and not torch.equal(dq.levels, levels)
    # the learned levels are no longer evenly spaced
    steps = dq.levels.detach().sort(-1).values.diff(dim=-1)
    assert float((steps.std(-1) / steps.mean(-1)).mean()) > 0.01


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int4", False), ("sparse24_int4", True)])
def test_export_refits_the_uniform_grid(fmt, symmetric):
    dq = DiffQuantLinear(_fake(fmt, 32, symmetric))
    _train(dq)
    fake = dq.to_fake()
    mod = dq.export()
    assert isinstance(mod, QuantLinear) and mod.fmt == fmt and mod.group_size == 32 and mod.symmetric == symmetric
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(fake(x), mod(x))  # the export is the re-fitted fake-quant forward exactly
        wq = dq.quant_weight()
        err = (mod.dequantize() - wq).pow(2).sum()
        # no worse than round-to-nearest of the learned weights onto a fresh grid
        rtn = FakeQuantLinear(wq, fmt, 32, symmetric, dq.mask).quant_weight()
        assert float(err) <= float((rtn - wq).pow(2).sum()) * (1 + 1e-6)
        assert float(err.sqrt() / wq.norm()) < 0.1
    if fmt == "sparse24_int4":
        assert torch.equal(sparse24_keep(mod), dq.mask)


def test_refuses_int8():
    with pytest.raises(ValueError, match="learns int4 levels"):
        DiffQuantLinear(_fake("int8", None))
