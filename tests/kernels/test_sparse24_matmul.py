import pytest
import torch

from llmcompress.kernels.sparse24_matmul import sparse24_matmul, sparse24_matmul_ref
from llmcompress.kernels.sparse24_pack import compress_24, prune_24

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max|y - ref| / max|ref|; fp32 on CUDA runs tl.dot in tf32
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _problem(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = prune_24(torch.randn(n, k, generator=g)).to(dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    return x, w, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(40, 100), (72, 256)])  # K=100: not a multiple of BLOCK_K nor of 32
@pytest.mark.parametrize("m", [1, 3, 16, 33])  # decode (<= 16) and prefill paths
def test_matches_reference(m, n, k, dtype):
    x, w, bias = _problem(m, n, k, dtype)
    values, meta = compress_24(w)
    y = sparse24_matmul(x, values, meta, bias)
    ref = sparse24_matmul_ref(x, values, meta, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    # the reference itself is the dense product of the 2:4 weight
    assert rel_err(ref, (x.float() @ w.float().T + bias.float()).to(dtype)) <= TOL[dtype]


@pytest.mark.parametrize("m", [2, 20])
def test_no_bias_and_batched_input(m):
    x, w, _ = _problem(m * 3, 48, 64, torch.float16, seed=1)
    values, meta = compress_24(w)
    y = sparse24_matmul(x.reshape(3, m, 64), values, meta)
    assert y.shape == (3, m, 48)
    assert rel_err(y.reshape(-1, 48), sparse24_matmul_ref(x, values, meta)) <= TOL[torch.float16]


def test_errors_have_hints():
    x, w, bias = _problem(4, 32, 64, torch.float16)
    values, meta = compress_24(w)
    with pytest.raises(ValueError, match="expects K=64"):
        sparse24_matmul(x[:, :32].contiguous(), values, meta)
    with pytest.raises(ValueError, match=r"not contiguous; pass x.contiguous\(\)"):
        sparse24_matmul(torch.randn(64, 4, device=DEVICE, dtype=torch.float16).t(), values, meta)
    with pytest.raises(ValueError, match=r"values.to\(torch.float32\)"):
        sparse24_matmul(x.float(), values, meta)
    with pytest.raises(ValueError, match="use float16, bfloat16 or float32"):
        sparse24_matmul(x.to(torch.int32), values, meta)
    with pytest.raises(ValueError, match=r"bias has shape \(31,\)"):
        sparse24_matmul(x, values, meta, bias[:31])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_gpu_large_fp16(m):
    x, w, bias = _problem(m, 4096, 4096, torch.float16)
    values, meta = compress_24(w)
    assert rel_err(sparse24_matmul(x, values, meta, bias), sparse24_matmul_ref(x, values, meta, bias)) <= 2e-3
