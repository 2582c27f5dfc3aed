"""Our packed formats <-> compressed-tensors, checked against the library's own compressors."""

import pytest
import torch

pytest.importorskip("compressed_tensors")  # installed by CI; the lent GPU machines lack it

from compressed_tensors.compressors import NaiveQuantizationCompressor, PackedQuantizationCompressor
from compressed_tensors.utils import unpack_bitmasks

from llmcompress.kernels.ct_convert import (
    CT_FORMAT,
    ct_scheme,
    int4_from_ct,
    int4_to_ct,
    int8_from_ct,
    int8_to_ct,
    sparse24_from_ct,
    sparse24_int4_from_ct,
    sparse24_int4_to_ct,
    sparse24_to_ct,
)
from llmcompress.kernels.int8 import quantize_int8
from llmcompress.kernels.sparse24_pack import compress_24_ref, prune_24
from llmcompress.kernels.sparse24_w4a16 import dequantize_sparse24_int4, quantize_sparse24_int4
from llmcompress.kernels.w4a16 import dequantize_int4, quantize_int4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _sparse(n, k, dtype):
    w = prune_24(torch.randn(n, k, generator=torch.Generator().manual_seed(0))).to(dtype)
    w[0, :8] = 0
    w[1, :4] = torch.tensor([0.0, 3.0, 0.0, 0.0])
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_pack_quantized(group_size, symmetric, dtype):
    w = torch.randn(20, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    qweight, scales, zeros = quantize_int4(w, group_size, symmetric)
    sd = int4_to_ct(qweight, scales, zeros)
    _exact(sd["weight_packed"], qweight)  # our layout is pack-quantized's, bit for bit
    assert ("weight_zero_point" in sd) == (not symmetric)
    back = int4_from_ct(sd)
    _exact(back[0], qweight)
    _exact(back[1], scales)
    assert (back[2] is None) if symmetric else torch.equal(back[2], zeros)
    scheme = ct_scheme("int4", group_size, symmetric)
    # the library decompresses our tensors to exactly our dequantized weight ...
    _exact(
        PackedQuantizationCompressor.decompress(sd, scheme)["weight"],
        dequantize_int4(qweight, scales, zeros, group_size),
    )
    # ... and compressing that weight with our scales/zero points gives back our tensors
    dense = {"weight": dequantize_int4(qweight, scales, zeros, group_size), "weight_scale": scales}
    if zeros is not None:
        dense["weight_zero_point"] = (zeros.to(torch.int16) - 8).to(torch.int8)
    compressed = PackedQuantizationCompressor.compress(dense, scheme)
    assert sorted(compressed) == sorted(sd)
    for key in sd:
        _exact(compressed[key], sd[key])


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_int_quantized(dtype):
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    q, scale = quantize_int8(w)
    sd = int8_to_ct(q, scale)
    back = int8_from_ct(sd)
    _exact(back[0], q)
    _exact(back[1], scale)
    deq = NaiveQuantizationCompressor.decompress(sd, ct_scheme("int8"))["weight"]
    _exact(deq, (q.float() * scale.float()[:, None]).to(dtype))
    assert CT_FORMAT["int8"] == CT_FORMAT["w8a8"] == "int-quantized"
    assert ct_scheme("w8a8").input_activations.dynamic


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_bitmask(dtype):
    w = _sparse(12, 96, dtype)
    values, meta = compress_24_ref(w)
    sd = sparse24_to_ct(values, meta)
    assert sd["bitmask"].dtype == torch.uint8 and sd["bitmask"].shape == (12, 12)
    assert sd["shape"].flatten().tolist() == [12, 96]
    # the format's decompression: scatter the values, row-major, into the bitmask positions
    mask = unpack_bitmasks(sd["bitmask"], [12, 96])
    assert (mask.reshape(12, 24, 4).sum(-1) == 2).all()
    dense = torch.zeros(12, 96, dtype=dtype)
    dense[mask] = sd["compressed"].flatten()
    _exact(dense, w)
    back = sparse24_from_ct(sd)
    _exact(back[0], values)
    _exact(back[1], meta)


def test_sparse24_bitmask_rejects_non_24_mask():
    values, meta = compress_24_ref(_sparse(4, 32, torch.float32))
    sd = sparse24_to_ct(values, meta)
    sd["bitmask"] = torch.full_like(sd["bitmask"], 0xFF)
    with pytest.raises(ValueError, match="not a 2:4 mask"):
        sparse24_from_ct(sd)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_int4(dtype, symmetric):
    w = _sparse(16, 128, dtype)
    packed = quantize_sparse24_int4(w, 32, symmetric)
    sd = sparse24_int4_to_ct(*packed, 32)
    dense = dequantize_sparse24_int4(*packed, 32)
    _exact(PackedQuantizationCompressor.decompress(sd, ct_scheme("sparse24_int4", 32, symmetric))["weight"], dense)
    for got, want in zip(sparse24_int4_from_ct(sd, 32), packed, strict=True):  # with the bitmask: exact
        assert (got is None and want is None) or torch.equal(got, want)
    # without it (a plain pack-quantized checkpoint) the dense weight is still exact
    plain = {key: val for key, val in sd.items() if key != "bitmask"}
    _exact(dequantize_sparse24_int4(*sparse24_int4_from_ct(plain, 32), 32), dense)
