"""Differentiable quantization (Polino, Pascanu & Alistarh 2018): learn the quantization points.

Each group of G input columns of a layer has L = 16 learnable levels p [N, K/G, L] (non-uniform: they
move freely). The full-precision weight W stays fixed, and so does its bin: the code a it has on the
starting uniform grid (round(W / s) + z, clamped). The quantized weight is that bin's level:
  W_q[n, k] = p[n, k // G, a(n, k)]
so the gradient of the loss reaches each level through the weights of its bin (hard assignment).
With `soft_temperature` τ the backward uses the soft assignment softmax_l(-(W / Δ + z - l)² / τ) instead
(Δ, z: the group's starting grid), which also lets the levels of neighbouring bins learn from a weight;
the forward value stays the hard one (straight-through soft assignment). Pruned weights stay 0.

Deployment needs a uniform int4 grid: `to_fake()` re-fits one per group to the learned quantized weights
(the better of a weighted least-squares fit of the sorted levels and round-to-nearest of W_q, by the
group's squared error) and returns the FakeQuantLinear whose export() is the deployable module.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcompress.recover.fakequant import FakeQuantLinear

LEVELS = 16  # int4


class DiffQuantLinear(nn.Module):
    """Learnable quantization points per group for the int4 formats (int4, sparse24_int4).

    weight: fixed buffer [N, K]; bins: fixed uint8 codes [N, K]; levels: parameter [N, K/G, 16];
    step, zero: buffers [N, K/G] (the starting grid).
    """

    def __init__(self, fake: FakeQuantLinear, soft_temperature: float | None = None):
        super().__init__()
        if fake.fmt not in ("int4", "sparse24_int4"):
            raise ValueError(f"differentiable quantization learns int4 levels; format {fake.fmt} has none "
                             "(use the uniform STE quantizer for int8, dense and 2:4 layers)")
        if soft_temperature is not None and soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be positive (or None for hard assignment), got {soft_temperature}")
        self.in_features, self.out_features, self.fmt = fake.in_features, fake.out_features, fake.fmt
        self.group_size, self.symmetric, self.dtype = fake.group_size, fake.symmetric, fake.dtype
        self.soft_temperature = soft_temperature
        with torch.no_grad():
            w = fake.masked_weight().detach()
            s, z = fake.scales().detach(), fake.zero.detach()  # [N, K/G]
            grid = torch.arange(LEVELS, dtype=torch.float32, device=w.device)
            levels = (grid - z[..., None]) * s[..., None]  # [N, K/G, L]: the uniform grid to start from
        self.register_buffer("weight", w.clone())
        self.register_buffer("bins", fake.codes().detach().to(torch.uint8))
        self.register_buffer("mask", None if fake.mask is None else fake.mask.clone())
        self.register_buffer("bias", None if fake.bias is None else fake.bias.clone())
        self.register_buffer("step", s.clone())
        self.register_buffer("zero", z.clone())
        self.levels = nn.Parameter(levels)

    def _grouped(self) -> torch.Tensor:
        n, k = self.weight.shape
        return self.weight.reshape(n, k // self.group_size, self.group_size)  # [N, K/G, G]

    def assignment(self) -> torch.Tensor:
        """The level (bin) of every weight. -> int64 [N, K/G, G]"""
        n, k = self.bins.shape
        return self.bins.long().reshape(n, k // self.group_size, self.group_size)

    def quant_weight(self) -> torch.Tensor:
        """W_q as fp32 values of dtype. -> [N, K]"""
        n, k = self.weight.shape
        a = self.assignment()
        hard = self.levels.gather(-1, a)  # [N, K/G, G]
        if self.soft_temperature is not None:
            grid = torch.arange(LEVELS, dtype=torch.float32, device=a.device)
            pos = self._grouped() / self.step[..., None] + self.zero[..., None]  # [N, K/G, G] in code units
            p = torch.softmax(-(pos[..., None] - grid) ** 2 / self.soft_temperature, -1)  # [N, K/G, G, L]
            soft = (p * self.levels[..., None, :]).sum(-1)
            hard = hard + (soft - soft.detach())
        wq = hard.reshape(n, k)
        if self.mask is not None:
            wq = torch.where(self.mask, wq, torch.zeros_like(wq))
        return wq.to(self.dtype).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() @ self.quant_weight().T
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    # ------------------------------------------------------------------------- export
    @torch.no_grad()
    def to_fake(self) -> FakeQuantLinear:
        """The nearest deployable form: a uniform int4 grid re-fitted per group to the learned W_q."""
        n, k = self.weight.shape
        G = self.group_size
        wq = self.quant_weight().reshape(n, k // G, G)  # [N, K/G, G]
        keep = None if self.mask is None else self.mask.reshape(n, k // G, G)
        cands = [_rtn_grid(wq, self.symmetric), _lsq_grid(self.levels, self.assignment(), keep, self.symmetric)]
        errs = [_grid_error(wq, s, z, keep) for s, z in cands]
        best = errs[1] < errs[0]  # [N, K/G]
        scale = torch.where(best, cands[1][0], cands[0][0]).to(self.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.where(best, cands[1][1], cands[0][1])
        bias = None if self.bias is None else self.bias
        return FakeQuantLinear(wq.reshape(n, k), self.fmt, G, self.symmetric, self.mask, scale.float(),
                               zero, bias, self.dtype)

    def export(self) -> nn.Module:
        return self.to_fake().export()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, levels={LEVELS}, soft_temperature={self.soft_temperature}")


def _rtn_grid(wq: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid of grouped weights [N, K/G, G] -> (scale, zero) [N, K/G]."""
    if symmetric:
        s = wq.abs().amax(-1) / 7
        return s, torch.full_like(s, 8.0)
    lo, hi = wq.amin(-1).clamp(max=0), wq.amax(-1).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, 15)
    return s, z


def _lsq_grid(levels: torch.Tensor, assign: torch.Tensor, keep: torch.Tensor | None,
              symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares fit of the sorted levels onto integer steps: p_(i) ≈ (i - z) s, weighted by
    how many (kept) weights use each level. levels [N, K/G, L], assign [N, K/G, G] -> (scale, zero)."""
    w = torch.ones_like(assign, dtype=torch.float32) if keep is None else keep.float()
    counts = torch.zeros_like(levels).scatter_add_(-1, assign, w)  # [N, K/G, L]
    p, order = levels.sort(-1)
    c = counts.gather(-1, order)
    i = torch.arange(LEVELS, dtype=torch.float32, device=levels.device).expand_as(p)
    if symmetric:
        j = i - 8
        s = (c * j * p).sum(-1) / (c * j * j).sum(-1).clamp_min(1e-12)
        return s.clamp_min(0), torch.full_like(s, 8.0)
    cs = c.sum(-1).clamp_min(1e-12)
    mi, mp = (c * i).sum(-1) / cs, (c * p).sum(-1) / cs
    di, dp = i - mi[..., None], p - mp[..., None]
    s = (c * di * dp).sum(-1) / (c * di**2).sum(-1).clamp_min(1e-12)
    s = s.clamp_min(0)
    z = torch.round(-(mp - s * mi) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, 15)
    return s, z


def _grid_error(wq: torch.Tensor, s: torch.Tensor, z: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Squared error of grouped weights [N, K/G, G] on the grid (s, z) [N, K/G]. -> [N, K/G]"""
    s = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    u = torch.clamp(torch.round(wq / s) + z[..., None], 0, 15)
    err = ((u - z[..., None]) * s - wq) ** 2
    return (err if keep is None else err * keep).sum(-1)
