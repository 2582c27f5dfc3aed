"""W4A16: int4 weights with group-wise scales (and optional zero points) x float activations.

Format ("int4"), for W: [N, K], group size G (K % G == 0, G % 8 == 0; 32/64/128 are tuned):
  qweight: int32 [N, K/8]. Unsigned code u(n, k) in 0..15 is the nibble at bits 4*(k % 8) of
           qweight[n, k // 8] (8 codes per int32, little-end first). This is bit for bit the
           compressed-tensors `pack-quantized` int4 `weight_packed` (which stores q + 8, q in -8..7).
  scales:  [N, K/G], float16/bfloat16/float32 (the activation dtype).
  zeros:   uint8 [N, K/G], codes 0..15 (asymmetric), or None (symmetric: zero code 8).
  W[n, k] = (u(n, k) - z(n, k // G)) * s(n, k // G), computed in fp32 and rounded to the scale dtype.
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
    check_2d,
    check_activation,
    check_bias,
    check_launchable,
    dot_t,
    launch_densify,
    launch_gemv,
    launch_matmul,
    load_rows,
    load_x,
    magic_base,
    magic_float,
    store_out,
    store_row,
    store_tile,
    tile_ids,
    to_int32_bits,
    tuned,
    tuned_gemv,
    use_dense,
    x_strided,
)

PREFILL, DECODE = UNPACK_PREFILL, UNPACK_DECODE  # literal tables in _utils, shared by the unpacking kernels
INTERPRET_PREFILL, INTERPRET_DECODE = UNPACK_INTERPRET_PREFILL, UNPACK_INTERPRET_DECODE
# M == 1: (BLOCK_N, BLOCK_K, num_warps). 4 words (16 bytes) per thread per chunk, and a 2048-column tile
# (16 chunks of 128 columns, unrolled) keeps a row's 1 KB in flight: ~4 MB at N = 4096
GEMV = [
    (16, 2048, 2),
    (32, 2048, 4),
    (8, 2048, 1),
    (64, 2048, 4),
    (16, 1024, 2),
    (8, 1024, 1),
]
INTERPRET_GEMV = [(16, 256, 4)]


def check_group_size(k: int, group_size: int) -> None:
    check(
        group_size > 0 and group_size % 8 == 0,
        f"group_size={group_size} must be a positive multiple of 8 (32, 64 or 128)",
    )
    if k % group_size:
        fits = [g for g in (128, 64, 32) if k % g == 0]
        hint = f"use group_size {fits[0]} or pad K" if fits else f"pad K to a multiple of {group_size}"
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}; {hint}")


# ---------------------------------------------------------------------------------------------
# packing and pure-torch reference


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [N, K] in 0..15, K % 8 == 0 -> int32 [N, K/8]."""
    n, k = codes.shape
    check(k % 8 == 0, f"K={k} is not a multiple of 8; int4 packing puts 8 codes in an int32 (pad K)")
    c = codes.long().reshape(n, k // 8, 8) << (4 * torch.arange(8, device=codes.device))
    return to_int32_bits(c.sum(-1))


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> uint8 codes [N, K]."""
    shifts = 4 * torch.arange(8, device=qweight.device)
    return ((qweight.long()[..., None] >> shifts) & 15).reshape(qweight.shape[0], -1).to(torch.uint8)


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest int4. w: [N, K] -> (qweight int32 [N, K/8], scales [N, K/G] in w's dtype, zeros).

    Asymmetric: the range [min(w, 0), max(w, 0)] of each group maps onto codes 0..15.
    Symmetric: scale = max|w| / 7, codes q + 8 with q in -8..7 (zeros is None).
    """
    check(w.dim() == 2 and w.is_floating_point(), f"expected a float weight [N, K], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    check_group_size(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scales = (g.abs().amax(-1) / 7).to(w.dtype)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = ((hi - lo) / 15).to(w.dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # all-zero groups
    s = scales.float()[..., None]
    if symmetric:
        zeros, z = None, 8.0
    else:
        zeros = torch.round(-lo / scales.float()).clamp(0, 15).to(torch.uint8)
        z = zeros.float()[..., None]
    codes = (torch.round(g / s) + z).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(codes), scales.contiguous(), zeros


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """-> W: [N, K] in scales' dtype (exactly what the kernel multiplies)."""
    u = unpack_int4(qweight).float()  # [N, K]
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, dim=1)
    return ((u - z) * scales.float().repeat_interleave(group_size, dim=1)).to(scales.dtype)


def w4a16_matmul_ref(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    """Pure torch: dequantize, matmul in fp32; returns x's dtype."""
    y = x.float() @ dequantize_int4(qweight, scales, zeros, group_size).float().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton


@triton.jit
def load_group_params(s_ptr, z_ptr, rn, N, k0, cols, K, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, dtype: tl.constexpr, UPCAST: tl.constexpr, WIDTH: tl.constexpr = 8):
    """Scales and (BASE + zero) of a tile's packed columns, shaped to broadcast over [BN, BC, 8].

    cols: [BC] packed columns, each WIDTH dense columns wide (starting at dense column WIDTH * col). A
    tile inside one group reads one scale per row; a longer one gathers per packed column (L1 hits).
    """
    n_groups = K // GROUP_SIZE
    if GROUP_SIZE % BLOCK_K == 0:
        gidx = rn[:, None, None] * n_groups + k0 // GROUP_SIZE  # [BN, 1, 1]
        mask = rn[:, None, None] < N
    else:
        gidx = rn[:, None, None] * n_groups + ((WIDTH * cols) // GROUP_SIZE)[None, :, None]  # [BN, BC, 1]
        mask = (rn[:, None, None] < N) & (WIDTH * cols[None, :, None] < K)
    scale = tl.load(s_ptr + gidx, mask=mask, other=0.0).to(dtype)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.int32)
    else:
        zero = tl.full(gidx.shape, 8, tl.int32)
    if UPCAST:
        return scale, zero
    return scale, (zero.to(dtype) + magic_base(dtype)).to(dtype)  # exact: small integers


@triton.jit
def dequant_codes(u, scale, zero, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Codes u (int32 0..15) -> (u - zero) * scale in dtype (scale, zero from load_group_params).

    Compiled: BASE + u by bit tricks (magic_float) minus the pre-added BASE + zero, exact in dtype,
    times the scale: one rounding, the same as the format's "fp32 product rounded to the scale dtype".
    """
    if UPCAST:  # the interpreter casts int32 to bfloat16 wrongly and has no bitcast tricks to test
        return ((u - zero).to(tl.float32) * scale.to(tl.float32)).to(dtype)
    return (magic_float(u, dtype) - zero) * scale


@triton.jit
def dequant_int4(word, scale, zero, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """word [BN, BC] int32 (8 codes each, low nibble first) -> [BN, BC, 8] weights."""
    u = (word[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15
    return dequant_codes(u, scale, zero, dtype, UPCAST)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _w4a16_kernel(
    # x: [M, K], qweight: [N, K/8], scales/zeros: [N, K/G], bias: [N], out: [M, N]
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, ld_w,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    BJ: tl.constexpr = BLOCK_K // 8
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_x(x_ptr, rm, k0 + tl.arange(0, BLOCK_K), M, K, EVEN_K)  # [BM, BK]
        jj = k0 // 8 + tl.arange(0, BJ)  # [BJ] packed columns
        word = load_rows(qw_ptr, rn, N, jj, K // 8, ld_w, EVEN_K, 0)  # [BN, BJ], 16-byte loads
        scale, zero = load_group_params(s_ptr, z_ptr, rn, N, k0, jj, K, GROUP_SIZE, BLOCK_K, HAS_ZEROS, dtype, UPCAST)
        w = tl.reshape(dequant_int4(word, scale, zero, dtype, UPCAST), (BLOCK_N, BLOCK_K))  # [BN, BK]
        acc = dot_t(acc, x, w, UPCAST)
    store_out(out_ptr, acc, bias_ptr, rm, rn, M, N, HAS_BIAS)


_prefill = tuned(_w4a16_kernel, PREFILL, INTERPRET_PREFILL)
_decode = tuned(_w4a16_kernel, DECODE, INTERPRET_DECODE)


@triton.jit
def _w4a16_gemv_kernel(
    # x: [1, K], qweight: [N, K/8], scales/zeros: [N, K/G], bias: [N], out: [1, N]
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    N, K, ld_w,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A K tile is NC chunks of C = min(G, 128) columns, unrolled so that their loads are in flight
    # together; a chunk lies inside one group, so its scale and zero are one value per row. Per word:
    # t = sum_s (code_s - zero) * x[8j + s] in fp32, then acc += t * scale. code_s - zero is computed as
    # (2^23 + code_s) - (2^23 + zero): the code is OR-ed into the mantissa of 2^23 instead of converted
    # (int -> float runs at a quarter of the FMA rate).
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    C: tl.constexpr = GROUP_SIZE if GROUP_SIZE < 128 else 128
    CW: tl.constexpr = C // 8
    NC: tl.constexpr = BLOCK_K // C if BLOCK_K // C < 16 else 16
    KW = K // 8
    n_groups = K // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, CW), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * NC * C, K, NC * C * SPLIT_K):
        for c in tl.static_range(NC):
            jj = (k0 + c * C) // 8 + tl.arange(0, CW)  # [CW] packed columns of this chunk
            word = load_rows(qw_ptr, rn, N, jj, KW, ld_w, EVEN_K, 0)  # [BN, CW]
            gmask = rn < tl.where(k0 + c * C < K, N, 0)  # rows, or none for a chunk past K
            gidx = rn * n_groups + (k0 + c * C) // GROUP_SIZE
            scale = tl.load(s_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)  # [BN]
            if HAS_ZEROS:
                zb = tl.load(z_ptr + gidx, mask=gmask, other=0).to(tl.float32)
            else:
                zb = tl.full((BLOCK_N,), 8.0, tl.float32)
            if not UPCAST:
                zb += 8388608.0
            t = tl.zeros((BLOCK_N, CW), dtype=tl.float32)
            for s in tl.static_range(8):
                u = (word >> (4 * s)) & 15
                if UPCAST:
                    w = u.to(tl.float32) - zb[:, None]
                else:
                    w = (u | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, None]
                t += w * x_strided(x_ptr, jj, s, 8, K, EVEN_K)[None, :]
            acc += t * scale[:, None]
    store_row(out_ptr, tl.sum(acc, axis=1), bias_ptr, rn, N, HAS_BIAS, SPLIT_K)


_gemv = tuned_gemv(_w4a16_gemv_kernel, GEMV, INTERPRET_GEMV)


@triton.jit
def _w4a16_densify_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, ld_w,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the matmul kernel's weight tile, stored: dense W [N, K] in the scales' dtype
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    jj = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    word = load_rows(qw_ptr, rn, N, jj, K // 8, ld_w, EVEN_K, 0)
    dtype = w_ptr.dtype.element_ty
    scale, zero = load_group_params(s_ptr, z_ptr, rn, N, k0, jj, K, GROUP_SIZE, BLOCK_K, HAS_ZEROS, dtype, UPCAST)
    w = tl.reshape(dequant_int4(word, scale, zero, dtype, UPCAST), (BLOCK_N, BLOCK_K))
    store_tile(w_ptr, w, rn, k0, N, K, BLOCK_K)


def w4a16_densify(qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """Dense W: [N, K] in scales' dtype, exactly dequantize_int4's values, Triton."""
    n, k = check_int4(qweight, scales, zeros, group_size)
    check_launchable(qweight, scales, *([zeros] if zeros is not None else []))
    args = (qweight, scales, zeros if zeros is not None else scales)
    return launch_densify(_w4a16_densify_kernel, n, k, args, scales.dtype, qweight.device, ld_w=qweight.stride(0),
                          GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None)


def check_int4(qweight, scales, zeros, group_size, k_packed_per_row: int = 8) -> tuple[int, int]:
    """Check an int4 weight and return (N, K). k_packed_per_row: original columns per int32 word."""
    check(
        qweight.dim() == 2 and qweight.dtype == torch.int32,
        f"qweight must be int32 [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}",
    )
    n, k = qweight.shape[0], qweight.shape[1] * k_packed_per_row
    check_group_size(k, group_size)
    check(qweight.is_contiguous(), "qweight is not contiguous; pass qweight.contiguous()")
    check_2d(scales, "scales", (n, k // group_size), (torch.float16, torch.bfloat16, torch.float32))
    if zeros is not None:
        check_2d(zeros, "zeros", (n, k // group_size), torch.uint8)
    return n, k


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    prefill: str = "auto",
) -> torch.Tensor:
    """x: [..., K] @ W^T (+ bias) with W int4 (see module docstring) -> [..., N], Triton.

    M == 1: GEMV kernel; M <= 16: tensor-core decode kernel; larger M: the fused kernel, or (prefill
    "dense", or "auto" with M >= DENSE_MIN_M) W densified once by Triton and multiplied by cuBLAS."""
    n, k = check_int4(qweight, scales, zeros, group_size)
    x2d = check_activation(x, k)
    check(
        scales.dtype == x.dtype, f"scales dtype {scales.dtype} differs from x dtype {x.dtype}; use scales.to({x.dtype})"
    )
    check_bias(bias, n, x.dtype)
    check_launchable(x, qweight, scales, *[t for t in (zeros, bias) if t is not None])
    args = (qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales)
    if use_dense(x2d.shape[0], prefill):
        w = w4a16_densify(qweight, scales, zeros, group_size)
        return torch.nn.functional.linear(x, w, bias)
    if x2d.shape[0] == 1 and group_size & (group_size - 1) == 0:  # power-of-two groups: GEMV chunks
        y = launch_gemv(_gemv, x2d, n, args, ld_w=qweight.stride(0), GROUP_SIZE=group_size,
                        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
        return y.reshape(*x.shape[:-1], n)
    y = launch_matmul(
        _decode, _prefill, x2d, n, args, ld_w=qweight.stride(0), GROUP_SIZE=group_size,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
    )
    return y.reshape(*x.shape[:-1], n)
