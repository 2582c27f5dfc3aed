import pytest
import torch

from llmcompress.kernels.w4a16 import (
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
    w4a16_matmul,
    w4a16_matmul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}
K_FOR_GROUP = {32: 160, 64: 192, 128: 256}  # 160: not a multiple of the interpreter's BLOCK_K=64


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_golden_packing():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0x87654321 - 2**32, 0xF0000000 - 2**32]]
    torch.testing.assert_close(unpack_int4(packed), codes, atol=0, rtol=0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_round_trip_and_rtn_bound(group_size, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * torch.rand(24, 1, generator=g)
    w[3, :group_size] = 0  # an all-zero group
    qweight, scales, zeros = quantize_int4(w, group_size, symmetric)
    assert qweight.shape == (24, 32) and scales.shape == (24, 256 // group_size)
    assert (zeros is None) == symmetric
    codes = unpack_int4(qweight)
    torch.testing.assert_close(pack_int4(codes), qweight, atol=0, rtol=0)
    deq = dequantize_int4(qweight, scales, zeros, group_size)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-5)).all()  # round to nearest, nothing clipped
    assert (deq[3, :group_size] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_matches_reference(m, group_size, symmetric, dtype):
    n, k = 40, K_FOR_GROUP[group_size]
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if m % 2 else None
    qweight, scales, zeros = quantize_int4(w, group_size, symmetric)
    y = w4a16_matmul(x, qweight, scales, zeros, group_size, bias)
    ref = w4a16_matmul_ref(x, qweight, scales, zeros, group_size, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(ref, x.float() @ w.float().T + (0 if bias is None else bias.float())) < 0.2  # int4 RTN error


def test_errors_have_hints():
    w = torch.randn(16, 96, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="K=96 is not a multiple of the group size 64; use group_size 32 or pad K"):
        quantize_int4(w, 64)
    with pytest.raises(ValueError, match="K=100 is not a multiple of the group size 64; pad K to a multiple of 64"):
        quantize_int4(torch.randn(4, 100), 64)
    qweight, scales, zeros = quantize_int4(w, 32)
    x = torch.randn(2, 96, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="K=96 is not a multiple of the group size 64"):
        w4a16_matmul(x, qweight, scales, zeros, 64)
    with pytest.raises(ValueError, match=r"scales.to\(torch.bfloat16\)"):
        w4a16_matmul(x.bfloat16(), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="zeros has dtype torch.int32"):
        w4a16_matmul(x, qweight, scales, zeros.int(), 32)
    with pytest.raises(ValueError, match="qweight must be int32"):
        w4a16_matmul(x, qweight.long(), scales, zeros, 32)
    with pytest.raises(ValueError, match="scales has shape"):
        w4a16_matmul(x, qweight, scales[:8].contiguous(), zeros, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_gpu_large_fp16(m, symmetric):
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    qweight, scales, zeros = quantize_int4(w, 128, symmetric)
    y = w4a16_matmul(x, qweight, scales, zeros, 128)
    assert rel_err(y, w4a16_matmul_ref(x, qweight, scales, zeros, 128)) <= 2e-3
