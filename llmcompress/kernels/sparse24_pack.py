"""2:4 semi-structured sparsity: compress a dense weight into values + 2-bit position metadata.

Format ("sparse24"), for a weight W: [N, K] with K % 4 == 0, groups of 4 consecutive columns:
  values: [N, K/2], dtype of W. Group g (columns 4g..4g+3) keeps two entries, in ascending column
          order, at values[:, 2g] and values[:, 2g+1].
  meta:   int32 [N, ceil(K/32)]. The column-in-group (0..3) of values[:, j] is the 2-bit field at
          bits 2*(j % 16) of meta[:, j // 16]. Equivalently word w holds groups 8w..8w+7, group 8w+i
          in bits 4i..4i+3 as (pos0 | pos1 << 2). Unused high bits of the last word are zero.
A group with fewer than two nonzeros keeps its nonzeros plus its lowest-index zeros, so the result
is deterministic and decompress(compress(W)) == W exactly. A group with more than two nonzeros is
not 2:4: validate_24 raises, prune_24 keeps the two largest magnitudes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, check, check_launchable, to_int32_bits

# rows x metadata words (32 columns each) per program; bigger tiles make the interpreter faster
BLOCK_N, BLOCK_W = (64, 8) if INTERPRET else (32, 8)


def meta_cols(k: int) -> int:
    return triton.cdiv(k, 32)


def validate_24(w: torch.Tensor) -> None:
    """Raise ValueError unless w: [N, K] has at most 2 nonzeros in every group of 4 along K."""
    check(w.dim() == 2, f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    check(k % 4 == 0, f"K={k} is not a multiple of 4; 2:4 sparsity needs K % 4 == 0 (pad K with zero columns)")
    counts = (w.reshape(n, k // 4, 4) != 0).sum(-1)  # [N, K/4]
    bad = (counts > 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise ValueError(
            f"weight is not 2:4 sparse: {len(bad)} of {counts.numel()} groups of 4 along K have more than "
            f"2 nonzeros (first: row {r}, columns {4 * g}..{4 * g + 3}); prune it first, e.g. with "
            "prune_24(w) or from_dense(..., prune=True)"
        )


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest magnitudes of every group of 4 along K (ties: the lower column survives)."""
    n, k = w.shape
    check(k % 4 == 0, f"K={k} is not a multiple of 4; pad K to use 2:4 sparsity")
    g = w.reshape(n, k // 4, 4)
    order = torch.sort(g.abs().float(), dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep, g, torch.zeros_like(g)).reshape(n, k)


# ---------------------------------------------------------------------------------------------
# pure-torch reference


def _positions(w: torch.Tensor) -> torch.Tensor:
    """w: [N, K] -> kept column-in-group positions [N, K/4, 2] (int64, ascending)."""
    n, k = w.shape
    nz = w.reshape(n, k // 4, 4) != 0
    key = (~nz).long() * 4 + torch.arange(4, device=w.device)  # nonzeros first, then low columns
    return key.argsort(dim=-1)[..., :2].sort(dim=-1).values


def pack_meta(pos: torch.Tensor) -> torch.Tensor:
    """Kept positions [N, K/4, 2] (ascending, 0..3) -> meta int32 [N, ceil(K/32)]."""
    n, groups = pos.shape[:2]
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).long()  # [N, K/4]
    nibble = torch.nn.functional.pad(nibble, (0, meta_cols(4 * groups) * 8 - groups)).reshape(n, -1, 8)
    return to_int32_bits((nibble << (4 * torch.arange(8, device=pos.device))).sum(-1))


def compress_24_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] 2:4 -> (values [N, K/2], meta int32 [N, ceil(K/32)])."""
    validate_24(w)
    n, k = w.shape
    pos = _positions(w)  # [N, K/4, 2]
    values = w.reshape(n, k // 4, 4).gather(-1, pos).reshape(n, k // 2)
    return values.contiguous(), pack_meta(pos)


def meta_positions(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta int32 [N, ceil(K/32)] -> column-in-group of every stored value, int64 [N, K/2]."""
    shifts = 2 * torch.arange(16, device=meta.device)
    pos = (meta.long()[..., None] >> shifts) & 3  # [N, words, 16]
    return pos.reshape(meta.shape[0], -1)[:, : k // 2]


def decompress_24_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/32)]) -> dense [N, K]."""
    n, k = values.shape[0], values.shape[1] * 2
    cols = meta_positions(meta, k) + 4 * (torch.arange(k // 2, device=values.device) // 2)
    return torch.zeros(n, k, dtype=values.dtype, device=values.device).scatter_(1, cols, values)


# ---------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _compress_kernel(w_ptr, val_ptr, meta_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # w: [N, K], values: [N, K/2], meta: [N, ceil(K/32)]; one program = BLOCK_N rows x BLOCK_W words
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW]
    n_words = tl.cdiv(K, 32)
    word = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for i in tl.static_range(8):
        g = rw * 8 + i  # group index [BW]
        mask = (rn[:, None] < N) & (g[None, :] < K // 4)
        src = w_ptr + rn[:, None] * K + 4 * g[None, :]
        a0 = tl.load(src, mask=mask, other=0.0)
        a1 = tl.load(src + 1, mask=mask, other=0.0)
        a2 = tl.load(src + 2, mask=mask, other=0.0)
        a3 = tl.load(src + 3, mask=mask, other=0.0)
        # priority: nonzeros first, then lower columns; keep the two best (keys are distinct)
        k0 = tl.where(a0 != 0, 0, 4)
        k1 = tl.where(a1 != 0, 1, 5)
        k2 = tl.where(a2 != 0, 2, 6)
        k3 = tl.where(a3 != 0, 3, 7)
        keep0 = ((k1 < k0).to(tl.int32) + (k2 < k0).to(tl.int32) + (k3 < k0).to(tl.int32)) < 2
        keep1 = ((k0 < k1).to(tl.int32) + (k2 < k1).to(tl.int32) + (k3 < k1).to(tl.int32)) < 2
        keep2 = ((k0 < k2).to(tl.int32) + (k1 < k2).to(tl.int32) + (k3 < k2).to(tl.int32)) < 2
        keep3 = ((k0 < k3).to(tl.int32) + (k1 < k3).to(tl.int32) + (k2 < k3).to(tl.int32)) < 2
        p0 = tl.where(keep0, 0, tl.where(keep1, 1, 2))
        p1 = tl.where(keep3, 3, tl.where(keep2, 2, 1))
        v0 = tl.where(p0 == 0, a0, tl.where(p0 == 1, a1, a2))
        v1 = tl.where(p1 == 3, a3, tl.where(p1 == 2, a2, a1))
        dst = val_ptr + rn[:, None] * (K // 2) + 2 * g[None, :]
        tl.store(dst, v0, mask=mask)
        tl.store(dst + 1, v1, mask=mask)
        word = word | (tl.where(mask, p0 | (p1 << 2), 0) << (4 * i))  # unused groups stay 0
    wmask = (rn[:, None] < N) & (rw[None, :] < n_words)
    tl.store(meta_ptr + rn[:, None] * n_words + rw[None, :], word, mask=wmask)


@triton.jit
def _decompress_kernel(val_ptr, meta_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    n_words = tl.cdiv(K, 32)
    wmask = (rn[:, None] < N) & (rw[None, :] < n_words)
    word = tl.load(meta_ptr + rn[:, None] * n_words + rw[None, :], mask=wmask, other=0)  # [BN, BW]
    for i in tl.static_range(8):
        g = rw * 8 + i
        mask = (rn[:, None] < N) & (g[None, :] < K // 4)
        src = val_ptr + rn[:, None] * (K // 2) + 2 * g[None, :]
        v0 = tl.load(src, mask=mask, other=0.0)
        v1 = tl.load(src + 1, mask=mask, other=0.0)
        p0 = (word >> (4 * i)) & 3
        p1 = (word >> (4 * i + 2)) & 3
        dst = w_ptr + rn[:, None] * K + 4 * g[None, :]
        for c in tl.static_range(4):
            out = tl.where(p0 == c, v0, tl.where(p1 == c, v1, tl.zeros_like(v0)))
            tl.store(dst + c, out, mask=mask)


def compress_24(w: torch.Tensor, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] 2:4 sparse, contiguous -> (values [N, K/2], meta int32 [N, ceil(K/32)]), Triton."""
    check(w.dim() == 2, f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    check(w.is_floating_point(), f"weight dtype {w.dtype} is not floating point; 2:4 packing keeps float values")
    check(w.is_contiguous(), "weight is not contiguous; pass w.contiguous()")
    check_launchable(w)
    if validate:
        validate_24(w)
    n, k = w.shape
    values = torch.empty(n, k // 2, dtype=w.dtype, device=w.device)
    meta = torch.empty(n, meta_cols(k), dtype=torch.int32, device=w.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(meta_cols(k), BLOCK_W))
    _compress_kernel[grid](w, values, meta, n, k, BLOCK_N=BLOCK_N, BLOCK_W=BLOCK_W)
    return values, meta


def check_packed_24(values: torch.Tensor, meta: torch.Tensor) -> tuple[int, int]:
    """Check (values [N, K/2], meta [N, ceil(K/32)]) and return (N, K)."""
    check(values.dim() == 2, f"values must be 2-D [N, K/2], got shape {tuple(values.shape)}")
    check(values.is_contiguous() and meta.is_contiguous(), "values and meta must be contiguous; call .contiguous()")
    n, k = values.shape[0], values.shape[1] * 2
    check(k % 4 == 0, f"values has {k // 2} columns, so K={k} is not a multiple of 4; was it made by compress_24?")
    check(meta.dtype == torch.int32, f"meta has dtype {meta.dtype}; expected torch.int32 (from compress_24)")
    check(
        tuple(meta.shape) == (n, meta_cols(k)),
        f"meta has shape {tuple(meta.shape)}; expected {(n, meta_cols(k))} for K={k}",
    )
    return n, k


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/32)]) -> dense [N, K], Triton."""
    n, k = check_packed_24(values, meta)
    check_launchable(values, meta)
    w = torch.empty(n, k, dtype=values.dtype, device=values.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(meta_cols(k), BLOCK_W))
    _decompress_kernel[grid](values, meta, w, n, k, BLOCK_N=BLOCK_N, BLOCK_W=BLOCK_W)
    return w
