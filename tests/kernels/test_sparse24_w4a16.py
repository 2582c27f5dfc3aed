import pytest
import torch

from llmcompress.kernels.sparse24_pack import compress_24_ref, prune_24
from llmcompress.kernels.sparse24_w4a16 import (
    dequantize_sparse24_int4,
    quantize_sparse24_int4,
    sparse24_w4a16_matmul,
    sparse24_w4a16_matmul_ref,
)
from llmcompress.kernels.w4a16 import quantize_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}
K_FOR_GROUP = {32: 160, 64: 192, 128: 256}


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _weight(n, k, dtype, seed=0):
    return prune_24(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).to(dtype).to(DEVICE)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_layout_is_int4_of_the_24_values(group_size, symmetric):
    w = _weight(24, 256, torch.float32)
    qvalues, meta, scales, zeros = quantize_sparse24_int4(w, group_size, symmetric)
    values, ref_meta = compress_24_ref(w)
    ref = quantize_int4(values, group_size // 2, symmetric)  # groups of G dense columns = G/2 values
    torch.testing.assert_close(meta, ref_meta, atol=0, rtol=0)
    torch.testing.assert_close(qvalues, ref[0], atol=0, rtol=0)
    torch.testing.assert_close(scales, ref[1], atol=0, rtol=0)
    assert scales.shape == (24, 256 // group_size) and qvalues.shape == (24, 16)
    deq = dequantize_sparse24_int4(qvalues, meta, scales, zeros, group_size)
    assert (deq[w == 0] == 0).all()  # pruned weights stay exactly zero
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_matches_reference(m, group_size, symmetric, dtype):
    n, k = 40, K_FOR_GROUP[group_size]
    w = _weight(n, k, dtype, seed=m)
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if m % 2 else None
    packed = quantize_sparse24_int4(w, group_size, symmetric)
    y = sparse24_w4a16_matmul(x, *packed, group_size, bias)
    ref = sparse24_w4a16_matmul_ref(x, *packed, group_size, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(ref, x.float() @ w.float().T + (0 if bias is None else bias.float())) < 0.2


def test_errors_have_hints():
    w = _weight(16, 96, torch.float16)
    with pytest.raises(ValueError, match="K=96 is not a multiple of the group size 64; use group_size 32"):
        quantize_sparse24_int4(w, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_sparse24_int4(w, 8)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        quantize_sparse24_int4(torch.ones(16, 96, device=DEVICE), 32)
    packed = quantize_sparse24_int4(w, 32)
    x = torch.randn(3, 96, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="meta must be int32"):
        sparse24_w4a16_matmul(x, packed[0], packed[1][:, :0].contiguous(), *packed[2:], 32)
    with pytest.raises(ValueError, match=r"scales.to\(torch.float32\)"):
        sparse24_w4a16_matmul(x.float(), *packed, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_gpu_large_fp16(m):
    w = prune_24(torch.randn(4096, 4096, device="cuda", dtype=torch.float16))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    packed = quantize_sparse24_int4(w, 128)
    assert rel_err(sparse24_w4a16_matmul(x, *packed, 128), sparse24_w4a16_matmul_ref(x, *packed, 128)) <= 2e-3
