import pytest
import torch

from llmcompress.kernels.int8 import (
    int8_dot_exact,
    quantize_int8,
    quantize_per_token,
    quantize_per_token_ref,
    w8a8_matmul,
    w8a8_matmul_ref,
    w8a16_matmul,
    w8a16_matmul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _problem(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    return x, w, bias


def test_quantize_int8_rtn_bound():
    _, w, _ = _problem(1, 32, 64, torch.float32)
    w[5] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (32,) and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - w).abs() <= 0.5 * scale[:, None] * (1 + 1e-5)).all()
    assert (q[5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [70, 1500])  # 1500: several blocks of the per-row loop
@pytest.mark.parametrize("m", [1, 3, 33])
def test_per_token_quant_matches_reference_exactly(m, k, dtype):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    # row 0: -1.484375 * 127 / 2.96875 = -63.5 in exact arithmetic, a rounding trap; zero last row
    x[0, :2] = torch.tensor([-1.484375, 2.96875])
    x[0, 2:] = x[0, 2:].clamp(-2.9, 2.9)
    x[1:][-1:] = 0
    xq, xs = quantize_per_token(x)
    ref_q, ref_s = quantize_per_token_ref(x)
    torch.testing.assert_close(xq, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(xs, ref_s, atol=0, rtol=0)
    if m > 1:
        assert (xq[-1] == 0).all() and xs[-1] == 0
    assert ((xq.float() * xs[:, None] - x.float()).abs() <= 0.5 * xs[:, None] * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_w8a16_matches_reference(m, dtype):
    x, w, bias = _problem(m, 40, 130, dtype)
    q, scale = quantize_int8(w)
    y = w8a16_matmul(x, q, scale, bias)
    assert y.shape == (m, 40) and y.dtype == dtype
    assert rel_err(y, w8a16_matmul_ref(x, q, scale, bias)) <= TOL[dtype]
    assert rel_err(y, x.float() @ w.float().T + bias.float()) < 0.02  # int8 weight error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_w8a8_matches_reference(m, dtype):
    x, w, bias = _problem(m, 40, 130, dtype, seed=1)
    q, scale = quantize_int8(w)
    y = w8a8_matmul(x, q, scale, bias if m > 1 else None)
    ref = w8a8_matmul_ref(x, q, scale, bias if m > 1 else None)
    assert y.shape == (m, 40) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(ref, w8a16_matmul_ref(x, q, scale, bias if m > 1 else None)) < 0.03  # activation rounding


def test_errors_have_hints():
    x, w, bias = _problem(2, 16, 32, torch.float16)
    q, scale = quantize_int8(w)
    with pytest.raises(ValueError, match="qweight has dtype torch.float16; expected torch.int8"):
        w8a16_matmul(x, w, scale)
    with pytest.raises(ValueError, match=r"scale must be a contiguous \[N\]=\(16,\)"):
        w8a8_matmul(x, q, scale[:, None])
    with pytest.raises(ValueError, match="expects K=32"):
        w8a8_matmul(x[:, :16].contiguous(), q, scale)
    with pytest.raises(ValueError, match=r"bias.to\(torch.float16\)"):
        w8a16_matmul(x, q, scale, bias.float())
    with pytest.raises(ValueError, match="expected x: \\[M, K\\]"):
        quantize_per_token(x[None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_gpu_large_fp16(m):
    x, w, bias = _problem(m, 4096, 4096, torch.float16)
    q, scale = quantize_int8(w)
    assert rel_err(w8a16_matmul(x, q, scale, bias), w8a16_matmul_ref(x, q, scale, bias)) <= 2e-3
    assert rel_err(w8a8_matmul(x, q, scale, bias), w8a8_matmul_ref(x, q, scale, bias)) <= 2e-3
    xq, xs = quantize_per_token(x)
    ref_q, ref_s = quantize_per_token_ref(x)
    torch.testing.assert_close(xs, ref_s, atol=0, rtol=0)
    assert (xq.int() - ref_q.int()).abs().max() <= 1 and (xq != ref_q).float().mean() < 1e-3


@pytest.mark.parametrize("k", [7, 1024, 1025, 3000])
def test_int8_dot_exact_is_the_integer_sum(k):
    # the worst case for fp32: every product at its largest magnitude, same sign, so the sum outgrows 2^24
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (6, k), generator=g, dtype=torch.int8)
    a[0], b[0] = -127, -127  # odd products: their sums past 2^24 are not fp32 numbers
    expect = a.long() @ b.long().T
    got = int8_dot_exact(a, b)
    assert got.dtype == torch.float64
    assert torch.equal(got.long(), expect)
