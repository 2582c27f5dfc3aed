"""Fake-quant modules: straight-through gradients, fixed masks, learnable scales, bit-exact export."""

import pytest
import torch
from torch import nn

from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.oneshot import gptq_quantize, sparsegpt_prune
from llmcompress.oneshot.magnitude import parse_pattern
from llmcompress.oneshot.rtn import QuantSpec
from llmcompress.recover import FakeQuantLinear, round_ste, sparse24_keep

CASES = {  # name: (fmt, group_size, symmetric)
    "int4_g32_sym": ("int4", 32, True),
    "int4_g64_asym": ("int4", 64, False),
    "int4_g128_sym": ("int4", 128, True),
    "sparse24_int4_g64": ("sparse24_int4", 64, True),
    "sparse24_int4_g32_asym": ("sparse24_int4", 32, False),
    "sparse24": ("sparse24", None, True),
    "int8": ("int8", None, True),
    "w8a8": ("w8a8", None, True),
    "dense": ("dense", None, True),
}


def _linear(n=48, k=128, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _train(fake, steps=20, lr=1e-3, weight_decay=0.1, seed=0):
    """A few AdamW steps towards a random target layer; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, fake.in_features, generator=g)
    target = x @ torch.randn(fake.out_features, fake.in_features, generator=g).T * 0.05
    opt = torch.optim.AdamW(fake.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = (fake(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_round_ste_passes_gradient():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]  # ties to even, like torch.round and the kernels' quantizers
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_ste_gradient_reaches_latent_weights_through_the_mask():
    fake = FakeQuantLinear.from_linear(_linear(), "sparse24_int4", group_size=32, symmetric=True)
    x = torch.randn(10, 128)
    fake(x).sum().backward()
    # symmetric RTN clips nothing, so d loss / d W = d loss / d W_q (straight through), times the mask
    want = x.sum(0).expand(48, 128) * fake.mask
    torch.testing.assert_close(fake.weight.grad, want)
    assert fake.scale.grad is not None and bool((fake.scale.grad != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_is_the_fake_quant_forward_bit_exactly(case, dtype):
    fmt, group, sym = CASES[case]
    fake = FakeQuantLinear.from_linear(_linear(dtype=dtype), fmt, group, sym)
    _train(fake, steps=3)  # off the round-to-nearest starting point
    x = torch.randn(2, 5, 128).to(dtype)
    mod = fake.export()
    assert type(mod) is {"dense": nn.Linear, "sparse24": Sparse24Linear}.get(fmt, QuantLinear)
    with torch.no_grad():
        assert torch.equal(fake(x), mod(x))  # CPU: the QuantLinear / Sparse24Linear reference path
        if fmt != "dense":
            assert torch.equal(fake.quant_weight().to(dtype), mod.dequantize())
    # and back: the deployable module as a starting point reproduces itself
    again = FakeQuantLinear.from_module(mod).export()
    for k, v in mod.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_oneshot_results_are_the_starting_point():
    """A SparseGPT 2:4 + GPTQ int4 result goes to fake-quant and back unchanged, bit for bit."""
    torch.manual_seed(0)
    w, x = torch.randn(32, 128), torch.randn(256, 128)
    H = 2 / len(x) * x.T @ x
    pruned, keep = sparsegpt_prune(w, H, parse_pattern("2:4"))
    q = gptq_quantize(pruned, H, QuantSpec(4, 64, True), keep)
    gptq = QuantLinear.from_codes("sparse24_int4", q.codes, q.scales, q.zeros, keep)
    fake = FakeQuantLinear.from_module(gptq)
    assert fake.fmt == "sparse24_int4" and fake.group_size == 64 and torch.equal(fake.mask, keep)
    back = fake.export()
    for k, v in gptq.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    sparse = Sparse24Linear.from_dense(nn.Linear(128, 32, bias=False), prune=True)
    assert torch.equal(FakeQuantLinear.from_module(sparse).export().values, sparse.values)


@pytest.mark.parametrize("fmt", ["sparse24_int4", "sparse24", "int4"])
def test_mask_stays_fixed_while_training(fmt):
    lin = _linear()
    if fmt == "int4":  # an unstructured mask (e.g. from a 0.5 ratio pruning) is held the same way
        with torch.no_grad():
            lin.weight[torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(3)) < 0.5] = 0
    fake = FakeQuantLinear.from_linear(lin, fmt, 32)
    before = fake.mask.clone()
    losses = _train(fake, steps=30, weight_decay=0.5)
    assert losses[-1] < losses[0]
    mod = fake.export()
    w = mod.dequantize() if fmt != "dense" else mod.weight
    assert torch.equal(fake.mask, before)
    assert bool((w[~before] == 0).all())
    if fmt.startswith("sparse24"):
        assert torch.equal(sparse24_keep(mod), before)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int8", None)])
def test_learned_scales_change_and_reduce_the_loss(fmt, group):
    fake = FakeQuantLinear.from_linear(_linear(), fmt, group, True)
    fake.weight.requires_grad_(False)  # scales alone
    start = fake.scale.detach().clone()
    losses = _train(fake, steps=30, lr=1e-3, weight_decay=0.0)
    assert not torch.equal(fake.scale, start)
    assert losses[-1] < losses[0]
    assert torch.equal(fake.export().dequantize(), fake.quant_weight().to(torch.float32))


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="sizes that fit: 32"):
        FakeQuantLinear.from_linear(_linear(k=96), "int4", group_size=64)
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        FakeQuantLinear.from_linear(_linear(), "int3")
    with pytest.raises(ValueError, match="not 2:4"):
        FakeQuantLinear.from_linear(_linear(), "sparse24", mask=torch.ones(48, 128, dtype=torch.bool))
