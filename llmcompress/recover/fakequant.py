"""Fake-quant linears: the trainable form of our deployable weight formats.

A FakeQuantLinear holds a latent fp32 weight W [N, K] (learnable), a fixed keep mask (2:4, n:m or any
zeros pattern; pruned weights stay exactly 0 whatever the optimiser does) and, for the quantized
formats, learnable scales on the kernels' integer grids (llmcompress.oneshot.rtn):
  int4 / sparse24_int4   codes u = clamp(round(W / s) + z, 0, 15) per group of G columns, W_q = (u - z) s
  int8 / w8a8            codes q = clamp(round(W / s), -127, 127) per output channel (w8a8 also
                         quantizes activations per token, as the kernel does)
round() passes gradients straight through (STE); clamp stops them for clipped weights; the scales
get LSQ's gradient through W_q = (u - z) s. Zero points stay fixed (their integer codes).

The forward computes exactly what the deployable module's reference path computes (scales rounded to
the deployment dtype, the same operations in the same order), so `export()` returns a QuantLinear /
Sparse24Linear / nn.Linear whose CPU forward equals this module's forward bit for bit, and which saves
as a compressed-tensors checkpoint (llmcompress.models.compressed).
"""

from __future__ import annotations

import torch
from torch import nn

from llmcompress.formats import QuantLinear, Sparse24Linear, weight_format
from llmcompress.kernels.int8 import int8_dot_exact
from llmcompress.kernels.sparse24_pack import decompress_24_ref, pack_meta
from llmcompress.oneshot.magnitude import keep_mask, parse_pattern
from llmcompress.oneshot.rtn import GROUP_SIZES, QuantSpec, qparams

FAKE_FORMATS = ("dense", "sparse24", "int4", "sparse24_int4", "int8", "w8a8")


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer (ties to even, like the kernels' quantizers); the gradient passes through."""
    return _RoundSTE.apply(x)


def spec_of(fmt: str, group_size: int | None = None, symmetric: bool = True) -> QuantSpec | None:
    """The integer grid of a weight format (None for dense and 2:4 alone)."""
    if fmt in ("int4", "sparse24_int4"):
        return QuantSpec(4, group_size, symmetric)
    if fmt in ("int8", "w8a8"):
        return QuantSpec(8, None, True)
    return None


def sparse24_keep(module: nn.Module) -> torch.Tensor:
    """The 2:4 keep mask bool [N, K] of a Sparse24Linear or sparse24_int4 QuantLinear."""
    if isinstance(module, Sparse24Linear):
        return decompress_24_ref(torch.ones_like(module.values), module.meta) != 0
    ones = torch.ones(module.out_features, module.in_features // 2, device=module.meta.device)
    return decompress_24_ref(ones, module.meta) != 0


def _check_24(mask: torch.Tensor, where: str) -> None:
    n, k = mask.shape
    if k % 4 or not bool((mask.reshape(n, k // 4, 4).sum(-1) == 2).all()):
        raise ValueError(f"{where}: the mask is not 2:4 (exactly 2 kept in every group of 4 along K); "
                         "build it with keep_mask(score, parse_pattern('2:4'))")


class FakeQuantLinear(nn.Module):
    """y = x @ W_q^T + b with W_q the format's fake-quantized (and masked) latent weight.

    weight: [N, K] fp32 parameter; scale: [N, K/G] (int4) or [N, 1] (int8) fp32 parameter; zero:
    [N, K/G] fp32 buffer (integer codes); mask: bool [N, K] buffer or None; bias: buffer or None.
    dtype is the deployment dtype (scales and weights are rounded to it as the kernels store them).
    """

    def __init__(self, weight: torch.Tensor, fmt: str = "int4", group_size: int | None = 128, symmetric: bool = True,
                 mask: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if fmt not in FAKE_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FAKE_FORMATS)}")
        n, k = weight.shape
        self.out_features, self.in_features, self.fmt = n, k, fmt
        self.dtype = dtype or weight.dtype
        self.spec = spec_of(fmt, group_size, symmetric)
        self.group_size = self.spec.group_size if self.spec is not None and self.spec.bits == 4 else None
        self.symmetric = symmetric if self.group_size else True
        if self.spec is not None and k % self.spec.group(k):
            hint = ", ".join(str(g) for g in GROUP_SIZES if k % g == 0) or "none"
            raise ValueError(f"group_size {group_size} does not divide the input width {k}; sizes that fit: {hint}")
        if fmt.startswith("sparse24"):
            if mask is None:
                raise ValueError(f"format {fmt} needs its 2:4 mask; use FakeQuantLinear.from_linear, which makes one")
            _check_24(mask, f"{fmt} [{n}, {k}]")
        w = weight.detach().float() * (mask if mask is not None else 1)
        self.weight = nn.Parameter(w.clone())
        self.register_buffer("mask", None if mask is None else mask.detach().bool().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.dtype).clone())
        if self.spec is None:
            self.scale, self.zero = None, None
            return
        if scale is None:  # round to nearest: the grid of llmcompress.oneshot.rtn
            g = self.spec.group(k)
            scale, zero = qparams(w.reshape(n, k // g, g), self.spec, self.dtype)  # [N, K/G]
        self.scale = nn.Parameter(scale.detach().float().reshape(n, -1).clone())
        if zero is None:
            zero = torch.full_like(self.scale, 8.0 if self.spec.bits == 4 else 0.0)
        self.register_buffer("zero", zero.detach().float().reshape(n, -1).clone())

    # ------------------------------------------------------------------------- constructors
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int4", group_size: int | None = 128, symmetric: bool = True,
                    mask: torch.Tensor | None = None) -> FakeQuantLinear:
        """A dense nn.Linear as the starting point (round-to-nearest scales). For the 2:4 formats the mask
        defaults to magnitude 2:4; for the others to the weight's existing zeros (if any)."""
        w = linear.weight.detach()
        if mask is None and fmt.startswith("sparse24"):
            mask = keep_mask(w.abs().float(), parse_pattern("2:4"))
        elif mask is None and bool((w == 0).any()):
            mask = w != 0
        return cls(w, fmt, group_size, symmetric, mask, bias=linear.bias, dtype=w.dtype)

    @classmethod
    def from_module(cls, module: nn.Module) -> FakeQuantLinear:
        """Our one-shot outputs (nn.Linear, Sparse24Linear, QuantLinear) as the starting point, in their own
        format: the codes, scales and mask they hold are reproduced exactly (export() gives them back)."""
        fmt = weight_format(module)
        if fmt == "dense":
            return cls.from_linear(module, "dense")
        w = module.dequantize()
        mask = sparse24_keep(module) if fmt.startswith("sparse24") else None
        if fmt == "sparse24":
            return cls(w, fmt, mask=mask, bias=module.bias, dtype=w.dtype)
        if fmt in ("int8", "w8a8"):
            return cls(w, fmt, scale=module.scale[:, None], bias=module.bias, dtype=module.scale.dtype)
        zero = None if module.zeros is None else module.zeros.float()
        return cls(w, fmt, module.group_size, module.symmetric, mask, module.scales, zero, module.bias,
                   module.scales.dtype)

    # ------------------------------------------------------------------------- the fake-quant forward
    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def scales(self) -> torch.Tensor:
        """The scales as deployed: rounded to dtype, kept positive. -> fp32 [N, K/G] or [N, 1]"""
        tiny = torch.finfo(self.dtype).tiny
        return self.scale.to(self.dtype).float().clamp_min(tiny)

    def codes(self) -> torch.Tensor:
        """Integer codes as fp32, gradients straight through. -> [N, K] (int4: 0..15, int8: -127..127)"""
        g = self.spec.group(self.in_features)
        s = self.scales().repeat_interleave(g, 1)
        z = self.zero.repeat_interleave(g, 1)
        lo, hi = self.spec.qrange
        u = torch.clamp(round_ste(self.masked_weight() / s) + z, lo, hi)
        return u if self.mask is None or self.spec.bits == 8 else torch.where(self.mask, u, z)

    def quant_weight(self) -> torch.Tensor:
        """The weight the deployed module multiplies by, as fp32 values of dtype. -> [N, K]"""
        if self.spec is None:
            return self.masked_weight().to(self.dtype).float()
        g = self.spec.group(self.in_features)
        s, z = self.scales().repeat_interleave(g, 1), self.zero.repeat_interleave(g, 1)
        return ((self.codes() - z) * s).to(self.dtype).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        if self.fmt == "w8a8":
            return self._w8a8(x, bias)
        if self.fmt == "int8":  # kernels.int8.w8a16_matmul_ref: (x @ q^T) * s
            y = (x.float() @ self.codes().T) * self.scales()[:, 0]
        else:  # dense / 2:4 / int4 references: x @ W^T in fp32
            y = x.float() @ self.quant_weight().T
        return (y if bias is None else y + bias).to(x.dtype)

    def _w8a8(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """kernels.int8.w8a8_matmul_ref with straight-through rounding of the activations."""
        x2d = x.reshape(-1, x.shape[-1]).float()  # [M, K]
        amax = x2d.abs().amax(-1)
        c127 = torch.full_like(amax, 127.0)
        inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
        xq = torch.clamp(round_ste(x2d * inv[:, None]), -127, 127)
        acc = int8_dot_exact(xq, self.codes()).float()  # the kernel's int32 sums, exactly
        y = acc * (amax / c127)[:, None] * self.scales()[:, 0]
        y = y if bias is None else y + bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    # ------------------------------------------------------------------------- export
    @torch.no_grad()
    def export(self) -> nn.Module:
        """The deployable module (nn.Linear, Sparse24Linear or QuantLinear) computing this forward exactly."""
        n, k = self.out_features, self.in_features
        bias = None if self.bias is None else self.bias.clone()
        if self.fmt == "dense":
            lin = nn.Linear(k, n, bias=bias is not None, dtype=self.dtype, device=self.weight.device)
            lin.weight.copy_(self.masked_weight().to(self.dtype))
            if bias is not None:
                lin.bias.copy_(bias)
            return lin.requires_grad_(False)
        if self.fmt == "sparse24":
            mod = Sparse24Linear(k, n, bias=False, dtype=self.dtype, device=self.weight.device)
            w = self.masked_weight().to(self.dtype)
            mod.values, mod.meta = w[self.mask].reshape(n, k // 2).contiguous(), self._meta()
            mod.register_buffer("bias", bias)
            return mod
        codes, scales = self.codes(), self.scales().to(self.dtype)
        if self.spec.bits == 8:
            return QuantLinear.from_codes(self.fmt, codes.to(torch.int8), scales[:, 0].contiguous(), bias=bias)
        zeros = None if self.symmetric else self.zero.to(torch.uint8)
        keep = self.mask if self.fmt == "sparse24_int4" else None
        return QuantLinear.from_codes(self.fmt, codes.to(torch.uint8), scales, zeros, keep, bias)

    def _meta(self) -> torch.Tensor:
        n, k = self.mask.shape
        g = self.mask.reshape(n, k // 4, 4)
        pos = torch.arange(4, device=g.device).expand(n, k // 4, 4)[g].reshape(n, k // 4, 2)
        return pack_meta(pos)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}, symmetric={self.symmetric}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{group}, "
                f"masked={self.mask is not None}, dtype={self.dtype}")


def to_fake_quant(module: nn.Module) -> FakeQuantLinear:
    """Any linear of ours (dense, 2:4, quantized) -> its trainable fake-quant form."""
    return FakeQuantLinear.from_module(module)
