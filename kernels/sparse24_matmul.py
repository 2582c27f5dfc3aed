"""y = x @ W^T + b with W: [N, K] given 2:4-compressed (values [N, K/2], meta; see sparse24_pack).

Each program streams the compressed values and metadata of a [BLOCK_K, BLOCK_N] tile, rebuilds the
dense tile in registers and feeds tl.dot. Decode (M <= 16): BLOCK_M = 16 and split-K so that enough
programs stream the weight; prefill: large square-ish tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    check,
    check_activation,
    check_bias,
    check_launchable,
    decode_configs,
    launch_matmul,
    prefill_configs,
    tile_ids,
)
from .sparse24_pack import check_packed_24, decompress_24_ref

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
PREFILL = [  # gathers of packed words/scales/metadata cost registers: no 128x256 tiles
    (128, 128, 64, 3, 8),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 128, 3, 4),
]
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps)
DECODE = [
    (16, 64, 128, 1, 4, 4),
    (16, 32, 128, 2, 4, 4),
    (16, 64, 256, 2, 3, 4),
    (16, 128, 128, 4, 3, 4),
    (16, 32, 256, 4, 3, 4),
]
INTERPRET_PREFILL = [(32, 32, 64, 1, 4)]
INTERPRET_DECODE = [(16, 32, 64, 2, 1, 4)]


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _sparse24_matmul_kernel(
    # x: [M, K], values: [N, K/2], meta: [N, ceil(K/32)], bias: [N], out: [M, N]
    x_ptr, val_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_words = tl.cdiv(K, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BK], original columns
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)  # [BK, BN]
        j0 = (rk // 4) * 2  # first stored value of the column's group
        vp = val_ptr + rn[None, :] * (K // 2) + j0[:, None]
        v0 = tl.load(vp, mask=wmask, other=0.0)
        v1 = tl.load(vp + 1, mask=wmask, other=0.0)
        word = tl.load(meta_ptr + rn[None, :] * n_words + (rk // 32)[:, None], mask=wmask, other=0)
        nib = (word >> (((rk % 32) // 4) * 4)[:, None]) & 15  # (pos0 | pos1 << 2) of the group
        col = (rk % 4)[:, None]
        w = tl.where((nib & 3) == col, v0, tl.where((nib >> 2) == col, v1, tl.zeros_like(v0)))  # [BK, BN]
        if UPCAST:  # the interpreter's bf16 dot is unreliable; products are exact in fp32 anyway
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    out = out_ptr + rm[:, None] * N + rn[None, :]
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask)


_prefill = triton.autotune(prefill_configs(PREFILL, INTERPRET_PREFILL), key=["M_BUCKET", "N", "K"])(
    _sparse24_matmul_kernel
)
_decode = triton.autotune(
    decode_configs(DECODE, INTERPRET_DECODE), key=["M_BUCKET", "N", "K"], reset_to_zero=["out_ptr"]
)(_sparse24_matmul_kernel)


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
    y = launch_matmul(_decode, _prefill, x2d, n, (values, meta, b), HAS_BIAS=bias is not None)
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
