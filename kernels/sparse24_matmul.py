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
    INTERPRET,
    check,
    check_activation,
    check_bias,
    check_launchable,
    dot_t,
    launch_matmul,
    load_rows,
    load_x,
    store_out,
    tile_ids,
    tuned,
)
from .sparse24_pack import check_packed_24, decompress_24_ref

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); BLOCK_K counts dense columns (>= 64)
PREFILL = [
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 8),
    (64, 128, 64, 4, 4),
    (64, 256, 64, 3, 8),
    (128, 256, 64, 3, 8),
    (128, 64, 64, 4, 4),
]
# decode: one 16-row M tile, narrow N tiles (every SM streams), several 16-byte loads in flight
DECODE = [
    (16, 16, 128, 6, 4),
    (16, 16, 128, 8, 2),
    (16, 32, 128, 6, 4),
    (16, 64, 128, 4, 4),
    (16, 16, 256, 4, 4),
    (16, 32, 256, 4, 4),
    (16, 16, 512, 3, 4),
    (16, 32, 128, 8, 8),
    (16, 64, 256, 3, 8),
]
INTERPRET_PREFILL = [(32, 32, 64, 1, 4)]
INTERPRET_DECODE = [(16, 32, 64, 1, 4)]


@triton.jit
def densify_24(v0, v1, rn, N, k0, meta_ptr, K, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept values v0, v1 [BN, BK/4] of the tile's 2:4 groups (columns k0 + 4g ..) -> dense [BN, BK].

    The positions come from the tile's BK/32 metadata words per row ([BN, BK/32] 16-byte loads), split
    into one 4-bit (pos0 | pos1 << 2) field per group in registers.
    """
    BG: tl.constexpr = BLOCK_K // 4
    BW: tl.constexpr = BLOCK_K // 32
    n_words = tl.cdiv(K, 32)
    words = load_rows(meta_ptr, rn, N, k0 // 32 + tl.arange(0, BW), n_words, n_words, EVEN_K, 0)  # [BN, BW]
    nib = tl.reshape((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, (BLOCK_N, BG))  # [BN, BG]
    col = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros_like(v0)[:, :, None]
    w = tl.where((nib & 3)[:, :, None] == col, v0[:, :, None], tl.where((nib >> 2)[:, :, None] == col, v1[:, :, None], zero))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))  # [BN, BG, 4] -> [BN, BK]


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _sparse24_matmul_kernel(
    # x: [M, K], values: [N, K/2] (PAIRS: the same bytes as int32 [N, K/4]), meta: [N, ceil(K/32)], bias: [N],
    # out: [M, N]
    x_ptr, val_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    BV: tl.constexpr = BLOCK_K // 2
    BG: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x(x_ptr, rm, k0 + tl.arange(0, BLOCK_K), M, K, EVEN_K)  # [BM, BK]
        if PAIRS:  # values viewed as int32 [N, K/4]: one word per 2:4 group, v0 in the low half
            pair = load_rows(val_ptr, rn, N, k0 // 4 + tl.arange(0, BG), K // 4, K // 4, EVEN_K, 0)  # [BN, BG]
            dtype = x_ptr.dtype.element_ty
            v0 = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
            v1 = (pair >> 16).to(tl.int16).to(dtype, bitcast=True)
        else:
            vals = load_rows(val_ptr, rn, N, k0 // 2 + tl.arange(0, BV), K // 2, K // 2, EVEN_K, 0.0)  # [BN, BK/2]
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BG, 2)))  # [BN, BK/4] each
        w = densify_24(v0, v1, rn, N, k0, meta_ptr, K, EVEN_K, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = dot_t(acc, x, w, UPCAST)
    store_out(out_ptr, acc, bias_ptr, rm, rn, M, N, HAS_BIAS)


_prefill = tuned(_sparse24_matmul_kernel, PREFILL, INTERPRET_PREFILL)
_decode = tuned(_sparse24_matmul_kernel, DECODE, INTERPRET_DECODE)


def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [..., K] @ W^T (+ bias) with W compressed by compress_24 -> [..., N], Triton."""
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
    y = launch_matmul(_decode, _prefill, x2d, n, (vals, meta, b), HAS_BIAS=bias is not None, PAIRS=pairs)
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
