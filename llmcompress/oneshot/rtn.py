"""Integer grids of the kernels' weight formats, and round-to-nearest quantization onto them.

int4 ("int4"/"sparse24_int4" kernels): per group of G input columns a scale s and a zero code z,
  codes u in 0..15, W = (u - z) * s. Symmetric: s = max|w| / 7, z = 8. Asymmetric: the range
  [min(w, 0), max(w, 0)] maps onto 0..15, z = round(-min / s).
int8 ("int8"/"w8a8" kernels): one scale per output channel, s = max|w| / 127, codes q in -127..127.
Scales are rounded to the weight's dtype before codes are computed, exactly as the kernels'
quantizers do, so codes and scales pack into the formats losslessly (tests check bit equality).
Weights outside `keep` (pruned) get the zero code: they dequantize to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4  # 4: group-wise int4; 8: per-channel int8
    group_size: int | None = 128  # int4 only
    symmetric: bool = True  # int8 is always symmetric

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"{self.bits}-bit weights are not supported; use 4 (group-wise) or 8 (per channel)")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")

    @property
    def qrange(self) -> tuple[int, int]:
        return (0, 15) if self.bits == 4 else (-127, 127)

    def group(self, k: int) -> int:
        """Columns per scale for an input width k (int8: the whole row)."""
        return self.group_size if self.bits == 4 else k


def check_group_size(name: str, k: int, spec: QuantSpec) -> None:
    """Refuse a group size that does not divide a layer's input width, naming the sizes that fit."""
    if spec.bits == 4 and k % spec.group_size:
        fits = [g for g in GROUP_SIZES if k % g == 0]
        hint = f"sizes that fit: {', '.join(map(str, fits))}" if fits else "no supported group size fits"
        raise ValueError(f"group_size {spec.group_size} does not divide the input width {k} of {name}; {hint}")


def qparams(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., G] (one group per row) -> (scale, zero) [...], fp32 values of the stored scale (in dtype)
    and zero code."""
    w = w.float()
    if spec.bits == 8 or spec.symmetric:
        scale = (w.abs().amax(-1) / (127 if spec.bits == 8 else 7)).to(dtype)
        lo = None
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).to(dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # all-zero groups
    if spec.bits == 8:
        zero = torch.zeros_like(scale)
    elif spec.symmetric:
        zero = torch.full_like(scale, 8.0)
    else:
        zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (as fp32 integers) of w on the grid (scale, zero), broadcast elementwise."""
    lo, hi = spec.qrange
    return torch.round(w.float() / scale).add_(zero).clamp_(lo, hi)


@dataclass
class Quantized:
    """A quantized weight, ready for QuantLinear.from_codes."""

    codes: torch.Tensor  # [N, K]: uint8 0..15 (int4) or int8 -127..127
    scales: torch.Tensor  # [N, K/G] (int4) or [N] (int8), in the weight's dtype
    zeros: torch.Tensor | None  # uint8 [N, K/G] (asymmetric int4) or None
    weight: torch.Tensor  # [N, K]: the dequantized weight the kernel multiplies by

    @classmethod
    def from_grid(cls, codes, scale, zero, spec: QuantSpec, dtype) -> "Quantized":
        """codes: [N, K] fp32; scale, zero: [N, K/G] fp32."""
        g = codes.shape[1] // scale.shape[1]
        s, z = scale.repeat_interleave(g, 1), zero.repeat_interleave(g, 1)
        weight = ((codes - z) * s).to(dtype)
        if spec.bits == 8:
            return cls(codes.to(torch.int8), scale[:, 0].to(dtype), None, weight)
        zeros = None if spec.symmetric else zero.to(torch.uint8)
        return cls(codes.to(torch.uint8), scale.to(dtype), zeros, weight)


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None) -> Quantized:
    """W: [N, K] -> Quantized, round to nearest; keep: bool [N, K] (pruned weights stay 0)."""
    N, K = W.shape
    G = spec.group(K)
    w = W.float() if keep is None else W.float() * keep
    scale, zero = qparams(w.reshape(N, K // G, G), spec, W.dtype)  # [N, K/G]
    codes = quantize(w.reshape(N, K // G, G), scale[..., None], zero[..., None], spec).reshape(N, K)
    if keep is not None:
        codes = torch.where(keep, codes, zero.repeat_interleave(G, 1))
    return Quantized.from_grid(codes, scale, zero, spec, W.dtype)
