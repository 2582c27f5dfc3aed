import pytest
import torch

from llmcompress.kernels import _utils
from llmcompress.kernels.sparse24_pack import (
    compress_24,
    compress_24_ref,
    decompress_24,
    decompress_24_ref,
    prune_24,
    validate_24,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sparse(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = prune_24(torch.randn(n, k, generator=g)).to(dtype)
    w[0, :16] = 0  # groups with no nonzeros
    if k >= 12:  # groups with one nonzero
        w[-1, 4:12] = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, -2.0, 0.0, 0.0])
    return w.to(DEVICE)


def test_golden_layout():
    # groups: none kept -> (0,1); one at 1 -> (0,1); (0,3); (1,2)
    w = torch.tensor([[0, 0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 2, 0, 3, 4, 0.0]], device=DEVICE)
    values, meta = compress_24_ref(w)
    assert values.tolist() == [[0, 0, 0, 5, 1, 2, 3, 4]]
    assert meta.tolist() == [[4 | 4 << 4 | 12 << 8 | 9 << 12]]
    kv, km = compress_24(w)
    torch.testing.assert_close(kv, values, atol=0, rtol=0)
    torch.testing.assert_close(km, meta, atol=0, rtol=0)


def test_high_bits_of_meta_are_signed_int32():
    w = torch.zeros(1, 32, device=DEVICE)
    w[0, 30:32] = 1.0  # group 7 keeps (2, 3): nibble 14 in bits 28..31
    _, meta = compress_24(w)
    assert meta.item() == 4 * sum(1 << 4 * i for i in range(7)) + (14 << 28) - 2**32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 4), (17, 100), (64, 256), (3, 36)])
def test_compress_matches_reference_and_round_trips(shape, dtype):
    w = _sparse(*shape, dtype)
    values, meta = compress_24(w)
    ref_values, ref_meta = compress_24_ref(w)
    torch.testing.assert_close(values, ref_values, atol=0, rtol=0)
    torch.testing.assert_close(meta, ref_meta, atol=0, rtol=0)
    torch.testing.assert_close(decompress_24(values, meta), w, atol=0, rtol=0)
    torch.testing.assert_close(decompress_24_ref(values, meta), w, atol=0, rtol=0)
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], -(-shape[1] // 32))


def test_validate_rejects_dense_with_hint():
    w = torch.ones(3, 8)
    w[1, 1] = w[1, 3] = 0  # only row 0 and 2 break 2:4; row 1 group 0 is fine
    with pytest.raises(ValueError, match=r"not 2:4 sparse.*first: row 0, columns 0\.\.3.*prune_24"):
        validate_24(w)
    with pytest.raises(ValueError, match="not 2:4"):
        compress_24(w.to(DEVICE))
    validate_24(prune_24(w))


def test_validate_rejects_bad_k():
    with pytest.raises(ValueError, match="K=6 is not a multiple of 4"):
        validate_24(torch.zeros(2, 6))


def test_prune_keeps_two_largest():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.5, 0.5, 0.5]])
    assert prune_24(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.5, 0.5, 0.0, 0.0]]


def test_wrapper_errors():
    values, meta = compress_24(_sparse(8, 64, torch.float16))
    with pytest.raises(ValueError, match="expected torch.int32"):
        decompress_24(values, meta.to(torch.int64))
    with pytest.raises(ValueError, match="meta has shape"):
        decompress_24(values, meta[:, :1].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        compress_24(_sparse(8, 64, torch.float16).t())


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        compress_24(torch.zeros(4, 8))
