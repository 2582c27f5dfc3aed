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
    UNPACK_DECODE,
    UNPACK_INTERPRET_DECODE,
    UNPACK_INTERPRET_PREFILL,
    UNPACK_PREFILL,
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
from .sparse24_matmul import densify_24, select4
from .sparse24_pack import compress_24, compress_24_ref, decompress_24_ref, meta_cols
from .w4a16 import check_group_size, check_int4, dequant_codes, dequantize_int4, load_group_params, quantize_int4

PREFILL, DECODE = UNPACK_PREFILL, UNPACK_DECODE  # literal tables in _utils, shared by the unpacking kernels
INTERPRET_PREFILL, INTERPRET_DECODE = UNPACK_INTERPRET_PREFILL, UNPACK_INTERPRET_DECODE
# M == 1: (BLOCK_N, BLOCK_K, num_warps); BLOCK_K dense columns (K/16 words), 4 words (16 bytes) per thread
GEMV = [
    (16, 1024, 2),
    (32, 1024, 4),
    (16, 2048, 4),
    (8, 1024, 1),
    (16, 512, 1),
    (8, 512, 1),
]
INTERPRET_GEMV = [(16, 256, 4)]


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


@triton.jit
def s24_int4_tile(qv_ptr, meta_ptr, s_ptr, z_ptr, rn, N, k0, K, ld_w, ld_meta, GROUP_SIZE: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, dtype: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense [BN, BK] weight tile at columns k0.. of a 2:4+int4 weight, in dtype."""
    BW: tl.constexpr = BLOCK_K // 16
    BG: tl.constexpr = BLOCK_K // 4
    shift = (8 * tl.arange(0, 4))[None, None, :]
    jj = k0 // 16 + tl.arange(0, BW)  # [BW] packed columns
    word = load_rows(qv_ptr, rn, N, jj, K // 16, ld_w, EVEN_K, 0)  # [BN, BW]
    scale, zero = load_group_params(s_ptr, z_ptr, rn, N, k0, jj, K, GROUP_SIZE, BLOCK_K, HAS_ZEROS, dtype, UPCAST, 16)
    v0 = dequant_codes((word[:, :, None] >> shift) & 15, scale, zero, dtype, UPCAST)  # [BN, BW, 4]
    v1 = dequant_codes((word[:, :, None] >> (shift + 4)) & 15, scale, zero, dtype, UPCAST)
    v0 = tl.reshape(v0, (BLOCK_N, BG))
    v1 = tl.reshape(v1, (BLOCK_N, BG))
    return densify_24(v0, v1, rn, N, k0, meta_ptr, K, ld_meta, EVEN_K, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _sparse24_w4a16_kernel(
    # x: [M, K], qvalues: [N, K/16], meta: [N, ceil(K/32)], scales/zeros: [N, K/G], out: [M, N]
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, ld_w, ld_meta,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Word w of a row holds the 8 kept values of 2:4 groups 4w..4w+3 (dense columns 16w..16w+15):
    # nibble 2t is group 4w+t's first value, nibble 2t+1 its second.
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x(x_ptr, rm, k0 + tl.arange(0, BLOCK_K), M, K, EVEN_K)  # [BM, BK]
        w = s24_int4_tile(qv_ptr, meta_ptr, s_ptr, z_ptr, rn, N, k0, K, ld_w, ld_meta, GROUP_SIZE, HAS_ZEROS,
                          dtype, UPCAST, EVEN_K, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc = dot_t(acc, x, w, UPCAST)
    store_out(out_ptr, acc, bias_ptr, rm, rn, M, N, HAS_BIAS)


_prefill = tuned(_sparse24_w4a16_kernel, PREFILL, INTERPRET_PREFILL)
_decode = tuned(_sparse24_w4a16_kernel, DECODE, INTERPRET_DECODE)


@triton.jit
def _sparse24_w4a16_gemv_kernel(
    # x: [1, K], qvalues: [N, K/16], meta: [N, ceil(K/32)], scales/zeros: [N, K/G], bias: [N], out: [1, N]
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    N, K, ld_w, ld_meta,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Word j holds 2:4 groups 4j..4j+3 (dense columns 16j..16j+15); group 4j+t's values are nibbles 2t
    # and 2t+1, each meeting x[16j + 4t + pos]. Per word: t = sum (code - zero) * x in fp32, then
    # acc += t * scale (a word never straddles a scale group). Codes become floats through the mantissa
    # of 2^23 (see w4a16). Scales, zeros and metadata are gathered per word (repeats: L1 hits).
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    BW: tl.constexpr = BLOCK_K // 16
    KW = K // 16
    n_groups = K // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        jj = k0 // 16 + tl.arange(0, BW)  # [BW] packed columns
        word = load_rows(qv_ptr, rn, N, jj, KW, ld_w, EVEN_K, 0)  # [BN, BW], 16-byte loads
        mask = (rn[:, None] < N) & (jj[None, :] < KW)
        gidx = rn[:, None] * n_groups + ((16 * jj) // GROUP_SIZE)[None, :]
        scale = tl.load(s_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.float32)
        else:
            zb = tl.full((BLOCK_N, BW), 8.0, tl.float32)
        if not UPCAST:
            zb += 8388608.0
        mw = tl.load(meta_ptr + rn[:, None] * ld_meta + (jj // 2)[None, :], mask=mask, other=0)
        mw = mw >> ((jj % 2) * 16)[None, :]  # this word's 4 groups in the low 16 bits
        t = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
        for g in tl.static_range(4):
            u0 = (word >> (8 * g)) & 15
            u1 = (word >> (8 * g + 4)) & 15
            if UPCAST:
                v0 = u0.to(tl.float32) - zb
                v1 = u1.to(tl.float32) - zb
            else:
                v0 = (u0 | 0x4B000000).to(tl.float32, bitcast=True) - zb
                v1 = (u1 | 0x4B000000).to(tl.float32, bitcast=True) - zb
            nib = (mw >> (4 * g)) & 15
            x0 = x_strided(x_ptr, jj, 4 * g, 16, K, EVEN_K)
            x1 = x_strided(x_ptr, jj, 4 * g + 1, 16, K, EVEN_K)
            x2 = x_strided(x_ptr, jj, 4 * g + 2, 16, K, EVEN_K)
            x3 = x_strided(x_ptr, jj, 4 * g + 3, 16, K, EVEN_K)
            t += v0 * select4(nib & 3, x0, x1, x2, x3) + v1 * select4(nib >> 2, x0, x1, x2, x3)
        acc += t * scale
    store_row(out_ptr, tl.sum(acc, axis=1), bias_ptr, rn, N, HAS_BIAS, SPLIT_K)


_gemv = tuned_gemv(_sparse24_w4a16_gemv_kernel, GEMV, INTERPRET_GEMV)


@triton.jit
def _sparse24_w4a16_densify_kernel(
    qv_ptr, meta_ptr, s_ptr, z_ptr, w_ptr, N, K, ld_w, ld_meta,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the matmul kernel's weight tile, stored: dense W [N, K] in the scales' dtype
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = s24_int4_tile(qv_ptr, meta_ptr, s_ptr, z_ptr, rn, N, k0, K, ld_w, ld_meta, GROUP_SIZE, HAS_ZEROS,
                      w_ptr.dtype.element_ty, UPCAST, EVEN_K, BLOCK_N, BLOCK_K)
    store_tile(w_ptr, w, rn, k0, N, K, BLOCK_K)


def sparse24_w4a16_densify(qvalues, meta, scales, zeros, group_size: int) -> torch.Tensor:
    """Dense W: [N, K] in scales' dtype, exactly dequantize_sparse24_int4's values, Triton."""
    _check_group(qvalues.shape[1] * 16, group_size)
    n, k = check_int4(qvalues, scales, zeros, group_size, k_packed_per_row=16)
    check_launchable(qvalues, meta, scales, *([zeros] if zeros is not None else []))
    args = (qvalues, meta, scales, zeros if zeros is not None else scales)
    return launch_densify(_sparse24_w4a16_densify_kernel, n, k, args, scales.dtype, qvalues.device,
                          ld_w=qvalues.stride(0), ld_meta=meta.stride(0), GROUP_SIZE=group_size,
                          HAS_ZEROS=zeros is not None)


def sparse24_w4a16_matmul(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    prefill: str = "auto",
) -> torch.Tensor:
    """x: [..., K] @ W^T (+ bias) with W 2:4 + int4 (see module docstring) -> [..., N], Triton.

    M == 1: GEMV kernel; M <= 16: tensor-core decode kernel; larger M: the fused kernel, or (prefill
    "dense", or "auto" with M >= DENSE_MIN_M) W densified once by Triton and multiplied by cuBLAS."""
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
    if use_dense(x2d.shape[0], prefill):
        w = sparse24_w4a16_densify(qvalues, meta, scales, zeros, group_size)
        return torch.nn.functional.linear(x, w, bias)
    if x2d.shape[0] == 1:
        y = launch_gemv(_gemv, x2d, n, args, ld_w=qvalues.stride(0), ld_meta=meta.stride(0),
                        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
        return y.reshape(*x.shape[:-1], n)
    y = launch_matmul(
        _decode, _prefill, x2d, n, args, ld_w=qvalues.stride(0), ld_meta=meta.stride(0), GROUP_SIZE=group_size,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
    )
    return y.reshape(*x.shape[:-1], n)
