"""llmcompress.formats: nn.Linear -> compressed modules, forward, state_dict."""

import copy

import pytest
import torch
from torch import nn

from llmcompress.formats import WEIGHT_FORMATS, QuantLinear, Sparse24Linear, make_linear, weight_format
from llmcompress.kernels.sparse24_pack import prune_24

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # fmt, from_dense kwargs, max relative error of the layer vs the original dense layer
    ("sparse24", {}, 0.0),
    ("int8", {}, 0.02),
    ("w8a8", {}, 0.04),
    ("int4", {"group_size": 32}, 0.15),
    ("int4", {"group_size": 128, "symmetric": True}, 0.2),
    ("sparse24_int4", {"group_size": 64}, 0.2),
    ("sparse24_int4", {"group_size": 32, "symmetric": True}, 0.2),
]


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _linear(k, n, bias, dtype, sparse):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).to(dtype).to(DEVICE)
    if sparse:
        with torch.no_grad():
            lin.weight.copy_(prune_24(lin.weight))
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt,kw,max_err", CASES)
def test_from_dense_forward(fmt, kw, max_err, bias):
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    lin = _linear(128, 48, bias, dtype, sparse="sparse24" in fmt)
    mod = make_linear(lin, fmt, **kw)
    assert weight_format(mod) == fmt
    x = torch.randn(2, 5, 128, device=DEVICE, dtype=dtype)  # [B, S, K]
    y = mod(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    with torch.no_grad():
        dense = nn.functional.linear(x, mod.dequantize(), lin.bias)
        # fp32 on CPU: the same sums; fp16 on CUDA: the kernel and cuBLAS round differently (~1 ulp)
        tol = 0.04 if fmt == "w8a8" else 1e-5 if DEVICE == "cpu" else 2e-3  # w8a8 also rounds x
        assert rel_err(y, dense) <= tol
        assert rel_err(y, lin(x)) <= max_err + 1e-5


@pytest.mark.parametrize("fmt,kw,_", CASES)
def test_state_dict_round_trip(fmt, kw, _):
    lin = _linear(128, 24, True, torch.float16, sparse="sparse24" in fmt)
    mod = make_linear(lin, fmt, **kw)
    sd = mod.state_dict()
    assert "bias" in sd and not any(v.is_floating_point() and v.dtype != torch.float16 for v in sd.values())
    if fmt == "sparse24":
        fresh = Sparse24Linear(128, 24, bias=True, dtype=torch.float16, device="meta")
    else:
        fresh = QuantLinear(128, 24, fmt, bias=True, dtype=torch.float16, device="meta", **kw)
    assert sorted(fresh.state_dict()) == sorted(sd)
    fresh.load_state_dict(sd, assign=True)
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(fresh(x), mod(x), atol=0, rtol=0)
    torch.testing.assert_close(fresh.dequantize(), mod.dequantize(), atol=0, rtol=0)


def test_buffers_and_names():
    lin = _linear(64, 16, True, torch.float32, sparse=False)
    int4 = make_linear(lin, "int4", group_size=32)
    assert set(int4.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    assert int4.qweight.shape == (16, 8) and int4.qweight.dtype == torch.int32
    assert set(make_linear(lin, "int4", group_size=32, symmetric=True).state_dict()) == {"qweight", "scales", "bias"}
    assert set(make_linear(lin, "w8a8").state_dict()) == {"qweight", "scale", "bias"}
    assert set(make_linear(lin, "sparse24_int4", group_size=32, prune=True).state_dict()) == {
        "qweight",
        "meta",
        "scales",
        "zeros",
        "bias",
    }
    assert make_linear(lin, "dense") is lin and weight_format(lin) == "dense"
    assert set(WEIGHT_FORMATS) == {"dense", "sparse24", "int8", "w8a8", "int4", "sparse24_int4"}


def test_sparse24_needs_24_weight_or_prune():
    lin = _linear(32, 8, False, torch.float32, sparse=False)
    with pytest.raises(ValueError, match="not 2:4 sparse.*prune=True"):
        Sparse24Linear.from_dense(lin)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        QuantLinear.from_dense(lin, "sparse24_int4", group_size=32)
    mod = Sparse24Linear.from_dense(lin, prune=True)
    torch.testing.assert_close(mod.dequantize(), prune_24(lin.weight.detach()), atol=0, rtol=0)


def test_errors():
    lin = _linear(96, 8, False, torch.float32, sparse=False)
    with pytest.raises(ValueError, match="unknown weight format 'fp8'"):
        make_linear(lin, "fp8")
    with pytest.raises(ValueError, match="K=96 is not a multiple of the group size 64; use group_size 32 or pad K"):
        make_linear(lin, "int4", group_size=64)
    with pytest.raises(ValueError, match="not a linear layer"):
        weight_format(nn.ReLU())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,kw,_", CASES)
def test_gpu_kernel_path_matches_cpu_reference(fmt, kw, _):
    lin = _linear(1024, 512, True, torch.float16, sparse="sparse24" in fmt)
    mod = make_linear(lin, fmt, **kw)
    x = torch.randn(7, 1024, device="cuda", dtype=torch.float16)
    ref = copy.deepcopy(mod).to("cpu").float()(x.cpu().float())  # the torch reference path, in fp32
    assert rel_err(mod(x).cpu(), ref) <= 5e-3
