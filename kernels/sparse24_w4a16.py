"""2:4 sparsity + int4 weights (W4A16) in one matmul: y = x @ W^T + b.

Format ("sparse24_int4"), for a 2:4-sparse W: [N, K], group size G (K % G == 0, G % 16 == 0):
  qvalues: int32 [N, K/16]. The 2:4 values [N, K/2] (see sparse24_pack) as int4 codes, packed along
           the compressed axis exactly like w4a16's qweight (code of value j at bits 4*(j % 8) of
           word j // 8).
  meta:    int32 [N, ceil(K/32)], the 2:4 positions (sparse24_pack format).
  scales:  [N, K/G] and zeros uint8 [N, K/G] or None (symmetric, zero code 8).
The groups are counted over the ORIGINAL K: group g covers dense columns [g*G, (g+1)*G), i.e. the
stored values [g*G/2, (g+1)*G/2) (a 2:4 group of 4 columns never straddles a G-group). So scales
have the same shape and meaning as compressed-tensors' pack-quantized group scales of the dense W,
and the kept values are quantized with group size G/2 on the compressed axis.
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
from .sparse24_pack import compress_24, compress_24_ref, decompress_24_ref, meta_cols
from .w4a16 import check_group_size, check_int4, dequantize_int4, quantize_int4

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); BLOCK_K counts dense columns
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
    (16, 64, 256, 2, 3, 4),
    (16, 128, 128, 2, 4, 4),
    (16, 32, 256, 4, 3, 4),
    (16, 128, 256, 4, 3, 8),
]
INTERPRET_PREFILL = [(32, 32, 64, 1, 4)]
INTERPRET_DECODE = [(16, 32, 64, 2, 1, 4)]


def _check_group(k: int, group_size: int) -> None:
    check(group_size % 16 == 0, f"group_size={group_size} must be a multiple of 16 for 2:4+int4 (32, 64 or 128)")
    check_group_size(k, group_size)


def quantize_sparse24_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """w: [N, K] 2:4 sparse -> (qvalues [N, K/16], meta [N, ceil(K/32)], scales [N, K/G], zeros)."""
    check(w.dim() == 2, f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    _check_group(w.shape[1], group_size)
    values, meta = compress_24(w.contiguous()) if w.is_cuda else compress_24_ref(w)
    qvalues, scales, zeros = quantize_int4(values, group_size // 2, symmetric)
    return qvalues, meta, scales, zeros


def dequantize_sparse24_int4(qvalues, meta, scales, zeros, group_size: int) -> torch.Tensor:
    """-> dense W: [N, K] in scales' dtype."""
    return decompress_24_ref(dequantize_int4(qvalues, scales, zeros, group_size // 2), meta)


def sparse24_w4a16_matmul_ref(x, qvalues, meta, scales, zeros, group_size, bias=None) -> torch.Tensor:
    y = x.float() @ dequantize_sparse24_int4(qvalues, meta, scales, zeros, group_size).float().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _sparse24_w4a16_kernel(
    # x: [M, K], qvalues: [N, K/16], meta: [N, ceil(K/32)], scales/zeros: [N, K/G], out: [M, N]
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_groups = K // GROUP_SIZE
    n_words = tl.cdiv(K, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # dense columns
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)  # [BK, BN]
        j0 = (rk // 4) * 2  # first stored value of the column's 2:4 group; j0 + 1 shares its int32 word
        word = tl.load(qv_ptr + rn[None, :] * (K // 16) + (j0 // 8)[:, None], mask=wmask, other=0)
        shift = ((j0 % 8) * 4)[:, None]
        gidx = rn[None, :] * n_groups + (rk // GROUP_SIZE)[:, None]
        s = tl.load(s_ptr + gidx, mask=wmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + gidx, mask=wmask, other=0).to(tl.int32)
        else:
            z = 8
        v0 = ((((word >> shift) & 15) - z).to(tl.float32) * s).to(x_ptr.dtype.element_ty)
        v1 = ((((word >> (shift + 4)) & 15) - z).to(tl.float32) * s).to(x_ptr.dtype.element_ty)
        meta = tl.load(meta_ptr + rn[None, :] * n_words + (rk // 32)[:, None], mask=wmask, other=0)
        nib = (meta >> (((rk % 32) // 4) * 4)[:, None]) & 15
        col = (rk % 4)[:, None]
        w = tl.where((nib & 3) == col, v0, tl.where((nib >> 2) == col, v1, tl.zeros_like(v0)))  # [BK, BN]
        if UPCAST:
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
    _sparse24_w4a16_kernel
)
_decode = triton.autotune(
    decode_configs(DECODE, INTERPRET_DECODE), key=["M_BUCKET", "N", "K"], reset_to_zero=["out_ptr"]
)(_sparse24_w4a16_kernel)


def sparse24_w4a16_matmul(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., K] @ W^T (+ bias) with W 2:4 + int4 (see module docstring) -> [..., N], Triton."""
    check(qvalues.dim() == 2, f"qvalues must be int32 [N, K/16], got shape {tuple(qvalues.shape)}")
    _check_group(qvalues.shape[1] * 16, group_size)
    n, k = check_int4(qvalues, scales, zeros, group_size, k_packed_per_row=16)
    check(
        meta.dtype == torch.int32 and tuple(meta.shape) == (n, meta_cols(k)),
        f"meta must be int32 {(n, meta_cols(k))}, got {meta.dtype} {tuple(meta.shape)}",
    )
    check(meta.is_contiguous(), "meta is not contiguous; pass meta.contiguous()")
    x2d = check_activation(x, k)
    check(
        scales.dtype == x.dtype, f"scales dtype {scales.dtype} differs from x dtype {x.dtype}; use scales.to({x.dtype})"
    )
    check_bias(bias, n, x.dtype)
    check_launchable(x, qvalues, meta, scales, *[t for t in (zeros, bias) if t is not None])
    args = (qvalues, meta, scales, zeros if zeros is not None else scales, bias if bias is not None else scales)
    y = launch_matmul(
        _decode, _prefill, x2d, n, args, GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None
    )
    return y.reshape(*x.shape[:-1], n)
