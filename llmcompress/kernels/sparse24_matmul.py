"""y = x @ W^T + b with W: [N, K] given 2:4-compressed (values [N, K/2], meta; see sparse24_pack).

Each program streams the compressed values and metadata of a [BLOCK_N, BLOCK_K] tile as 16-byte row
loads, rebuilds the dense tile in registers and feeds tl.dot. Decode (M <= 16): BLOCK_M = 16 and narrow
N tiles so that every SM streams weight; prefill: large tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    UNPACK_DECODE,
    UNPACK_INTERPRET_DECODE,
    UNPACK_INTERPRET_PREFILL,
    UNPACK_PREFILL,
    INTERPRET,
    check,
    check_activation,
    check_bias,
    check_launchable,
    dot_t,
    launch_densify,
    launch_gemv,
    launch_matmul,
    load_rows,
    load_x,
    store_out,
    store_row,
    store_tile,
    tile_ids,
    tuned,
    tuned_gemv,
    use_dense,
    x_strided,
)
from .sparse24_pack import check_packed_24, decompress_24_ref

PREFILL, DECODE = UNPACK_PREFILL, UNPACK_DECODE  # literal tables in _utils, shared by the unpacking kernels
INTERPRET_PREFILL, INTERPRET_DECODE = UNPACK_INTERPRET_PREFILL, UNPACK_INTERPRET_DECODE
# M == 1: (BLOCK_N, BLOCK_K, num_warps); BLOCK_K dense columns, 4 groups (16 bytes of values) per thread
GEMV = [
    (16, 512, 2),
    (32, 512, 4),
    (8, 512, 1),
    (16, 1024, 4),
    (16, 256, 1),
    (8, 256, 1),
]
INTERPRET_GEMV = [(16, 128, 4)]


@triton.jit
def densify_24(v0, v1, rn, N, k0, meta_ptr, K, ld_meta, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept values v0, v1 [BN, BK/4] of the tile's 2:4 groups (columns k0 + 4g ..) -> dense [BN, BK].

    The positions come from the tile's BK/32 metadata words per row ([BN, BK/32] 16-byte loads), split
    into one 4-bit (pos0 | pos1 << 2) field per group in registers.
    """
    BG: tl.constexpr = BLOCK_K // 4
    BW: tl.constexpr = BLOCK_K // 32
    n_words = tl.cdiv(K, 32)
    words = load_rows(meta_ptr, rn, N, k0 // 32 + tl.arange(0, BW), n_words, ld_meta, EVEN_K, 0)  # [BN, BW]
    nib = tl.reshape((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, (BLOCK_N, BG))  # [BN, BG]
    col = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros_like(v0)[:, :, None]
    w = tl.where((nib & 3)[:, :, None] == col, v0[:, :, None], tl.where((nib >> 2)[:, :, None] == col, v1[:, :, None], zero))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))  # [BN, BG, 4] -> [BN, BK]


@triton.jit
def load_pairs(val_ptr, rn, N, k0, K, ld_w, PAIRS: tl.constexpr, EVEN_K: tl.constexpr, dtype: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept values (v0, v1) [BN, BK/4] of the tile's 2:4 groups."""
    BG: tl.constexpr = BLOCK_K // 4
    if PAIRS:  # values viewed as int32 [N, K/4]: one word per 2:4 group, v0 in the low half
        pair = load_rows(val_ptr, rn, N, k0 // 4 + tl.arange(0, BG), K // 4, ld_w, EVEN_K, 0)  # [BN, BG]
        v0 = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        v1 = (pair >> 16).to(tl.int16).to(dtype, bitcast=True)
    else:
        vals = load_rows(val_ptr, rn, N, k0 // 2 + tl.arange(0, 2 * BG), K // 2, ld_w, EVEN_K, 0.0)
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BG, 2)))
    return v0, v1


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _sparse24_matmul_kernel(
    # x: [M, K], values: [N, K/2] (PAIRS: the same bytes as int32 [N, K/4]), meta: [N, ceil(K/32)], bias: [N],
    # out: [M, N]
    x_ptr, val_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, ld_w, ld_meta,
    HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x(x_ptr, rm, k0 + tl.arange(0, BLOCK_K), M, K, EVEN_K)  # [BM, BK]
        v0, v1 = load_pairs(val_ptr, rn, N, k0, K, ld_w, PAIRS, EVEN_K, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
        w = densify_24(v0, v1, rn, N, k0, meta_ptr, K, ld_meta, EVEN_K, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = dot_t(acc, x, w, UPCAST)
    store_out(out_ptr, acc, bias_ptr, rm, rn, M, N, HAS_BIAS)


_prefill = tuned(_sparse24_matmul_kernel, PREFILL, INTERPRET_PREFILL)
_decode = tuned(_sparse24_matmul_kernel, DECODE, INTERPRET_DECODE)


@triton.jit
def select4(p, x0, x1, x2, x3):
    """p [BN, BG] in 0..3 -> x_p, with x_c: [BG] the c-th column of each 2:4 group."""
    return tl.where(p == 0, x0[None, :], tl.where(p == 1, x1[None, :], tl.where(p == 2, x2[None, :], x3[None, :])))


@triton.jit
def group_positions(meta_ptr, rn, N, gg, K, ld_meta, EVEN_K: tl.constexpr):
    """(pos0, pos1) [BN, BG] of 2:4 groups gg: 4-bit fields of the metadata words (repeats: L1 hits)."""
    n_groups = K // 4
    if EVEN_K:
        word = tl.load(meta_ptr + rn[:, None] * ld_meta + (gg // 8)[None, :], mask=rn[:, None] < N, other=0)
    else:
        mask = (rn[:, None] < N) & (gg[None, :] < n_groups)
        word = tl.load(meta_ptr + rn[:, None] * ld_meta + (gg // 8)[None, :], mask=mask, other=0)
    nib = (word >> ((gg % 8) * 4)[None, :]) & 15
    return nib & 3, nib >> 2


@triton.jit
def _sparse24_gemv_kernel(
    # x: [1, K], values: [N, K/2] (PAIRS: int32 [N, K/4]), meta: [N, ceil(K/32)], bias: [N], out: [1, N]
    x_ptr, val_ptr, meta_ptr, bias_ptr, out_ptr,
    N, K, ld_w, ld_meta,
    HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each kept value meets the x column its 2-bit position names: y[n] = sum_g v0 * x[4g + pos0] +
    # v1 * x[4g + pos1]. No dense tile is built and no x column is read for the zeros.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    BG: tl.constexpr = BLOCK_K // 4
    n_groups = K // 4
    acc = tl.zeros((BLOCK_N, BG), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        gg = k0 // 4 + tl.arange(0, BG)  # [BG] 2:4 groups
        if PAIRS:
            pair = load_rows(val_ptr, rn, N, gg, n_groups, ld_w, EVEN_K, 0)  # [BN, BG], 16-byte loads
            dtype = x_ptr.dtype.element_ty
            v0 = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
            v1 = (pair >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        else:
            v0 = load_rows(val_ptr, rn, N, 2 * gg, K // 2, ld_w, EVEN_K, 0.0).to(tl.float32)
            v1 = load_rows(val_ptr + 1, rn, N, 2 * gg, K // 2, ld_w, EVEN_K, 0.0).to(tl.float32)
        p0, p1 = group_positions(meta_ptr, rn, N, gg, K, ld_meta, EVEN_K)
        x0 = x_strided(x_ptr, gg, 0, 4, K, EVEN_K)
        x1 = x_strided(x_ptr, gg, 1, 4, K, EVEN_K)
        x2 = x_strided(x_ptr, gg, 2, 4, K, EVEN_K)
        x3 = x_strided(x_ptr, gg, 3, 4, K, EVEN_K)
        acc += v0 * select4(p0, x0, x1, x2, x3) + v1 * select4(p1, x0, x1, x2, x3)
    store_row(out_ptr, tl.sum(acc, axis=1), bias_ptr, rn, N, HAS_BIAS, SPLIT_K)


_gemv = tuned_gemv(_sparse24_gemv_kernel, GEMV, INTERPRET_GEMV)


@triton.jit
def _sparse24_densify_kernel(
    val_ptr, meta_ptr, w_ptr, N, K, ld_w, ld_meta,
    PAIRS: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the matmul kernel's weight tile, stored as contiguous rows of the dense W [N, K]
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    v0, v1 = load_pairs(val_ptr, rn, N, k0, K, ld_w, PAIRS, EVEN_K, w_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
    w = densify_24(v0, v1, rn, N, k0, meta_ptr, K, ld_meta, EVEN_K, BLOCK_N, BLOCK_K)
    store_tile(w_ptr, w, rn, k0, N, K, BLOCK_K)


def sparse24_densify(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense W: [N, K] from (values, meta), exactly decompress_24_ref, Triton (row-contiguous stores)."""
    n, k = check_packed_24(values, meta)
    check_launchable(values, meta)
    pairs = values.element_size() == 2 and not INTERPRET
    vals = values.view(torch.int32) if pairs else values
    return launch_densify(_sparse24_densify_kernel, n, k, (vals, meta), values.dtype, values.device,
                          ld_w=vals.stride(0), ld_meta=meta.stride(0), PAIRS=pairs)


def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
    prefill: str = "auto",
) -> torch.Tensor:
    """x: [..., K] @ W^T (+ bias) with W compressed by compress_24 -> [..., N], Triton.

    M == 1: GEMV kernel; M <= 16: tensor-core decode kernel; larger M: the fused kernel, or (prefill
    "dense", or "auto" with M >= DENSE_MIN_M) W densified once by Triton and multiplied by cuBLAS."""
    n, k = check_packed_24(values, meta)
    x2d = check_activation(x, k)
    check(
        values.dtype == x.dtype, f"values dtype {values.dtype} differs from x dtype {x.dtype}; use values.to({x.dtype})"
    )
    check_bias(bias, n, x.dtype)
    check_launchable(x, values, meta, *([bias] if bias is not None else []))
    b = bias if bias is not None else values  # dummy pointer when HAS_BIAS is False
    # 16-bit values are read as int32 pairs (one 2:4 group per word): plain 16-byte loads, no reshuffle
    pairs = values.element_size() == 2 and not INTERPRET
    vals = values.view(torch.int32) if pairs else values
    if use_dense(x2d.shape[0], prefill):
        return torch.nn.functional.linear(x, sparse24_densify(values, meta), bias)
    if x2d.shape[0] == 1:
        y = launch_gemv(_gemv, x2d, n, (vals, meta, b), ld_w=vals.stride(0), ld_meta=meta.stride(0),
                        HAS_BIAS=bias is not None, PAIRS=pairs)
        return y.reshape(*x.shape[:-1], n)
    y = launch_matmul(_decode, _prefill, x2d, n, (vals, meta, b), ld_w=vals.stride(0), ld_meta=meta.stride(0),
                      HAS_BIAS=bias is not None, PAIRS=pairs)
    return y.reshape(*x.shape[:-1], n)


def sparse24_matmul_ref(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure torch: decompress then matmul in fp32; returns x's dtype."""
    w = decompress_24_ref(values, meta).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
