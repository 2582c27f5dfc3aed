"""The three M regimes of every compressed matmul (GEMV at M == 1, decode, prefill) and the two prefill
paths: the fused Triton kernel and a Triton-densified weight multiplied by torch (cuBLAS on CUDA)."""

import pytest
import torch

from llmcompress.kernels import _utils
from llmcompress.kernels.sparse24_matmul import sparse24_densify, sparse24_matmul, sparse24_matmul_ref
from llmcompress.kernels.sparse24_pack import compress_24_ref, decompress_24_ref, prune_24
from llmcompress.kernels.sparse24_w4a16 import (
    dequantize_sparse24_int4,
    quantize_sparse24_int4,
    sparse24_w4a16_densify,
    sparse24_w4a16_matmul,
    sparse24_w4a16_matmul_ref,
)
from llmcompress.kernels.w4a16 import dequantize_int4, quantize_int4, w4a16_densify, w4a16_matmul, w4a16_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 40, 256


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _formats(dtype, group_size=64, seed=0):
    """{name: (matmul(x, prefill), reference(x), densify(), exact dense W)} for one random weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype).to(DEVICE)
    w24 = prune_24(w)
    values, meta = compress_24_ref(w24)
    q4 = quantize_int4(w, group_size, symmetric=False)
    q24 = quantize_sparse24_int4(w24, group_size, symmetric=True)
    return {
        "sparse24": (
            lambda x, p: sparse24_matmul(x, values, meta, prefill=p),
            lambda x: sparse24_matmul_ref(x, values, meta),
            lambda: sparse24_densify(values, meta),
            decompress_24_ref(values, meta),
        ),
        "int4": (
            lambda x, p: w4a16_matmul(x, *q4, group_size, prefill=p),
            lambda x: w4a16_matmul_ref(x, *q4, group_size),
            lambda: w4a16_densify(*q4, group_size),
            dequantize_int4(*q4, group_size),
        ),
        "sparse24_int4": (
            lambda x, p: sparse24_w4a16_matmul(x, *q24, group_size, prefill=p),
            lambda x: sparse24_w4a16_matmul_ref(x, *q24, group_size),
            lambda: sparse24_w4a16_densify(*q24, group_size),
            dequantize_sparse24_int4(*q24, group_size),
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["sparse24", "int4", "sparse24_int4"])
def test_densify_is_bit_exact(fmt, dtype):
    _, _, densify, dense = _formats(dtype)[fmt]
    w = densify()
    assert w.dtype == dense.dtype and w.shape == (N, K)
    # Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding: one bf16 step there
    tol = 2**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    torch.testing.assert_close(w, dense, atol=0, rtol=tol)


@pytest.mark.parametrize("prefill", ["fused", "dense", "auto"])
@pytest.mark.parametrize("fmt", ["sparse24", "int4", "sparse24_int4"])
def test_prefill_paths_match_reference(fmt, prefill):
    matmul, ref, _, _ = _formats(torch.float16)[fmt]
    for m in (20, _utils.DENSE_MIN_M):  # below and at the switch to the dense path
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        y = matmul(x, prefill)
        assert y.shape == (m, N) and y.dtype == torch.float16
        assert rel_err(y, ref(x)) <= 2e-3, (fmt, prefill, m)


def test_decode_sizes_ignore_the_prefill_choice():
    matmul, ref, _, _ = _formats(torch.float16)["int4"]
    for m in (1, 3, 16):  # GEMV, then the tensor-core decode kernel
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        assert rel_err(matmul(x, "dense"), ref(x)) <= 2e-3


def test_unknown_prefill_is_a_one_line_error():
    matmul, _, _, _ = _formats(torch.float16)["sparse24"]
    x = torch.randn(32, K).half().to(DEVICE)
    with pytest.raises(ValueError, match="prefill='fast'; use 'auto', 'fused' or 'dense'"):
        matmul(x, "fast")


@pytest.mark.parametrize("fmt", ["sparse24", "int4", "sparse24_int4", "int8", "w8a8"])
def test_gemv_split_k_matches_reference(fmt):
    # a short, wide layer: the 4-bit and 2:4 GEMVs split K over programs that add into fp32 (int8: one pass)
    from llmcompress.kernels.int8 import quantize_int8, w8a8_matmul, w8a8_matmul_ref, w8a16_matmul, w8a16_matmul_ref

    n, k = 24, 4096
    assert _utils.gemv_split(n, k) == 4
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(n, k, generator=g) / k**0.5).half().to(DEVICE)
    x = torch.randn(1, k, generator=g).half().to(DEVICE)
    bias = torch.randn(n, generator=g).half().to(DEVICE)
    if fmt == "sparse24":
        values, meta = compress_24_ref(prune_24(w))
        y, ref = sparse24_matmul(x, values, meta, bias), sparse24_matmul_ref(x, values, meta, bias)
    elif fmt == "int4":
        q = quantize_int4(w, 128)
        y, ref = w4a16_matmul(x, *q, 128, bias), w4a16_matmul_ref(x, *q, 128, bias)
    elif fmt == "sparse24_int4":
        q = quantize_sparse24_int4(prune_24(w), 128)
        y, ref = sparse24_w4a16_matmul(x, *q, 128, bias), sparse24_w4a16_matmul_ref(x, *q, 128, bias)
    else:
        q, scale = quantize_int8(w)
        f, r = (w8a16_matmul, w8a16_matmul_ref) if fmt == "int8" else (w8a8_matmul, w8a8_matmul_ref)
        y, ref = f(x, q, scale, bias), r(x, q, scale, bias)
    assert y.shape == (1, n) and y.dtype == torch.float16
    assert rel_err(y, ref) <= 2e-3


def test_unknown_prefill_fails_at_decode_sizes_too():
    matmul, _, _, _ = _formats(torch.float16)["int4"]
    with pytest.raises(ValueError, match="prefill='fast'"):
        matmul(torch.randn(1, K).half().to(DEVICE), "fast")
