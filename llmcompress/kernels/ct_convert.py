"""Lossless conversion between our packed weights and compressed-tensors checkpoint tensors.

All dicts use the compressed-tensors local names of one Linear module (prefix them with the
module path when writing a checkpoint):
  pack-quantized (int4):  weight_packed int32 [N, K/8] (q + 8 nibbles, our qweight bit for bit),
                          weight_scale [N, K/G], weight_zero_point int32 [ceil(N/8), K/G]
                          (signed zero points z - 8 packed along N; asymmetric only),
                          weight_shape int64 [2].
  int-quantized (int8):   weight int8 [N, K], weight_scale [N, 1].
  sparse-24-bitmask:      compressed [N, K/2] (our values), bitmask uint8 [N, ceil(K/8)]
                          (numpy packbits, little bit order, of the kept positions: exactly 2 per
                          group of 4), shape int64 [2, 1].
  2:4 + int4:             the pack-quantized dict of the dense int4 weight (pruned entries hold the
                          zero point, so they dequantize to exactly 0) plus "bitmask" as above,
                          which keeps the kept positions exact when a kept value quantizes to 0.
Packing goes through compressed-tensors' own helpers (pack_to_int32, pack_bitmasks); the tests
check the results against its compressors.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks

from ._utils import check
from .sparse24_pack import meta_positions, pack_meta
from .w4a16 import pack_int4, unpack_int4

# our weight format name -> compressed-tensors format of its weight
CT_FORMAT = {
    "int4": CompressionFormat.pack_quantized.value,
    "int8": CompressionFormat.int_quantized.value,
    "w8a8": CompressionFormat.int_quantized.value,
    "sparse24": CompressionFormat.sparse_24_bitmask.value,
    "sparse24_int4": CompressionFormat.pack_quantized.value,
}


def ct_scheme(fmt: str, group_size: int | None = None, symmetric: bool = True) -> QuantizationScheme:
    """The compressed-tensors QuantizationScheme of one of our quantized formats."""
    if fmt in ("int4", "sparse24_int4"):
        check(group_size is not None, f"{fmt} needs group_size")
        weights = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=group_size)
        return QuantizationScheme(targets=["Linear"], weights=weights)
    weights = QuantizationArgs(num_bits=8, symmetric=True, strategy="channel")
    if fmt == "int8":
        return QuantizationScheme(targets=["Linear"], weights=weights)
    if fmt == "w8a8":
        acts = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    raise ValueError(f"no quantization scheme for format {fmt!r}; expected int4, sparse24_int4, int8 or w8a8")


# ---------------------------------------------------------------------------------------------
# int4 <-> pack-quantized


def int4_to_ct(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Our int4 (qweight [N, K/8], scales [N, K/G], zeros uint8 or None) -> pack-quantized tensors."""
    q = (unpack_int4(qweight).to(torch.int16) - 8).to(torch.int8)  # signed codes [N, K]
    sd = {
        "weight_packed": pack_to_int32(q.cpu(), 4).to(qweight.device),
        "weight_scale": scales.clone(),
        "weight_shape": torch.tensor(list(q.shape)),
    }
    if zeros is not None:
        zp = (zeros.to(torch.int16) - 8).to(torch.int8)
        sd["weight_zero_point"] = pack_to_int32(zp.cpu(), 4, packed_dim=0).to(zeros.device)
    return sd


def int4_from_ct(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """pack-quantized int4 tensors -> (qweight, scales, zeros or None)."""
    n, k = (int(v) for v in sd["weight_shape"].flatten().tolist())
    check(k % 8 == 0, f"K={k} is not a multiple of 8; our int4 format packs 8 codes per int32")
    q = unpack_from_int32(sd["weight_packed"].cpu(), 4, torch.Size([n, k]))  # signed int8 [N, K]
    qweight = pack_int4((q.to(torch.int16) + 8).to(torch.uint8)).to(sd["weight_packed"].device)
    scales = sd["weight_scale"].clone()
    zeros = None
    if "weight_zero_point" in sd:
        zp = unpack_from_int32(sd["weight_zero_point"].cpu(), 4, torch.Size(scales.shape), packed_dim=0)
        zeros = (zp.to(torch.int16) + 8).to(torch.uint8).to(scales.device)
    return qweight, scales, zeros


# ---------------------------------------------------------------------------------------------
# int8 <-> int-quantized


def int8_to_ct(qweight: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": qweight.clone(), "weight_scale": scale.reshape(-1, 1).clone()}


def int8_from_ct(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    check(sd["weight"].dtype == torch.int8, f"expected an int8 weight, got {sd['weight'].dtype}")
    return sd["weight"].clone(), sd["weight_scale"].reshape(-1).clone()


# ---------------------------------------------------------------------------------------------
# 2:4 <-> sparse-24-bitmask


def _mask_from_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta -> bool [N, K], True at the 2 kept positions of every group."""
    cols = meta_positions(meta, k) + 4 * (torch.arange(k // 2, device=meta.device) // 2)
    return torch.zeros(meta.shape[0], k, dtype=torch.bool, device=meta.device).scatter_(1, cols, True)


def _meta_from_mask(mask: torch.Tensor) -> torch.Tensor:
    n, k = mask.shape
    g = mask.reshape(n, k // 4, 4)
    check(bool((g.sum(-1) == 2).all()), "the bitmask does not keep exactly 2 of every 4 weights; it is not a 2:4 mask")
    pos = g.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :2].sort(dim=-1).values
    return pack_meta(pos)


def sparse24_to_ct(values: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    n, k = values.shape[0], values.shape[1] * 2
    mask = _mask_from_meta(meta, k)
    return {
        "shape": torch.tensor([n, k]).reshape(-1, 1),
        "compressed": values.clone(),
        "bitmask": pack_bitmasks(mask.cpu()).to(values.device),
    }


def sparse24_from_ct(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = (int(v) for v in sd["shape"].flatten().tolist())
    mask = unpack_bitmasks(sd["bitmask"].cpu(), [n, k]).to(sd["compressed"].device)
    return sd["compressed"].clone(), _meta_from_mask(mask)


# ---------------------------------------------------------------------------------------------
# 2:4 + int4 <-> pack-quantized (+ bitmask)


def sparse24_int4_to_ct(qvalues, meta, scales, zeros, group_size: int) -> dict[str, torch.Tensor]:
    n, k = qvalues.shape[0], qvalues.shape[1] * 16
    mask = _mask_from_meta(meta, k)
    if zeros is None:
        codes = torch.full((n, k), 8, dtype=torch.uint8, device=qvalues.device)
    else:
        codes = zeros.repeat_interleave(group_size, dim=1)  # pruned entries hold the zero point
    codes[mask] = unpack_int4(qvalues).flatten()  # row-major, so ascending columns per row
    sd = int4_to_ct(pack_int4(codes), scales, zeros)
    sd["bitmask"] = pack_bitmasks(mask.cpu()).to(qvalues.device)
    return sd


def sparse24_int4_from_ct(sd: dict[str, torch.Tensor], group_size: int):
    """-> (qvalues, meta, scales, zeros). Without "bitmask", the kept positions are the entries that
    differ from the zero point, filled up to 2 per group with the lowest columns."""
    qweight, scales, zeros = int4_from_ct(sd)
    codes = unpack_int4(qweight)  # [N, K]
    n, k = codes.shape
    if "bitmask" in sd:
        mask = unpack_bitmasks(sd["bitmask"].cpu(), [n, k]).to(codes.device)
    else:
        zero_code = 8 if zeros is None else zeros.repeat_interleave(group_size, dim=1)
        nz = (codes != zero_code).reshape(n, k // 4, 4)
        check(bool((nz.sum(-1) <= 2).all()), "the weight is not 2:4 sparse; store it as int4 instead")
        key = (~nz).long() * 4 + torch.arange(4, device=codes.device)
        pos = key.argsort(dim=-1)[..., :2]
        mask = torch.zeros_like(nz).scatter_(-1, pos, True).reshape(n, k)
    meta = _meta_from_mask(mask)
    qvalues = pack_int4(codes[mask].reshape(n, k // 2))
    return qvalues, meta, scales, zeros
