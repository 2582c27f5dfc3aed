"""int8 weights: W8A16 (float activations) and W8A8 (int8 activations, dynamic per-token scales).

Format ("int8"/"w8a8"), for W: [N, K]:
  qweight: int8 [N, K], symmetric per output channel, codes in -127..127.
  scale:   [N] float (the weight's dtype); W[n, k] ~= qweight[n, k] * scale[n].
Activations for W8A8 (computed on the fly): xq int8 [M, K] and x_scale fp32 [M] with
  x_scale = max|x[m]| / 127 and xq = round_half_even(x * (127 / max|x[m]|)) clamped to -127..127.
  y = (xq @ qweight^T as int32) * x_scale[m] * scale[n] (+ bias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._utils import (
    INTERPRET,
    check,
    check_2d,
    check_activation,
    check_bias,
    check_launchable,
    launch_gemv,
    launch_matmul,
    load_rows,
    load_x,
    store_out,
    store_row,
    tile_ids,
    tuned,
    tuned_gemv,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
PREFILL = [
    (128, 128, 64, 4, 8),
    (128, 256, 128, 3, 8),
    (64, 128, 128, 4, 4),
    (128, 128, 128, 3, 8),
    (128, 256, 64, 4, 8),
]
# decode: one 16-row M tile, narrow N tiles (every SM streams), 16-byte loads of 16 codes
DECODE = [
    (16, 16, 256, 5, 4),
    (16, 32, 256, 4, 4),
    (16, 16, 512, 4, 4),
    (16, 32, 512, 3, 4),
    (16, 64, 256, 4, 4),
    (16, 32, 256, 6, 8),
    (16, 64, 512, 3, 8),
    (16, 16, 256, 8, 2),
]
INTERPRET_PREFILL = [(32, 32, 64, 1, 4)]
INTERPRET_DECODE = [(16, 32, 64, 1, 4)]
# M == 1: (BLOCK_N, BLOCK_K, num_warps); 16 codes (16 bytes) per thread and row
GEMV = [
    (16, 512, 4),
    (8, 512, 2),
    (16, 1024, 4),
    (32, 512, 8),
    (8, 1024, 4),
    (4, 512, 1),
]
INTERPRET_GEMV = [(16, 128, 4)]
QUANT_BLOCK = 1024  # columns per step of the per-token quantization kernel


# ---------------------------------------------------------------------------------------------
# pure-torch reference


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (qweight int8 [N, K], scale [N] in w's dtype), symmetric per channel, RTN."""
    check(w.dim() == 2 and w.is_floating_point(), f"expected a float weight [N, K], got {w.dtype} {tuple(w.shape)}")
    scale = (w.float().abs().amax(1) / 127).to(w.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float -> (xq int8 [M, K], x_scale fp32 [M]), as in the module docstring."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: torch computes `127.0 / amax` as a reciprocal
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, amax / c127


EXACT_FP32_COLUMNS = 1024  # 1024 * 128 * 127 < 2^24: fp32 sums of that many int8 products are exact integers


def int8_dot_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [M, K], b: [N, K] holding integers in [-128, 127] (any dtype) -> a @ b.T exactly, as float64 [M, N].

    What the kernel's int32 accumulator holds, from fp32 matmuls (several times faster than fp64 on CPU):
    over at most EXACT_FP32_COLUMNS columns every partial sum is an integer below 2^24, so exact in any
    order; the chunks are added in fp64. Differentiable (the int8 path of recovery training uses it)."""
    out = None
    for k0 in range(0, a.shape[-1], EXACT_FP32_COLUMNS):
        k1 = k0 + EXACT_FP32_COLUMNS
        part = (a[:, k0:k1].float() @ b[:, k0:k1].float().T).double()
        out = part if out is None else out + part
    return out


def w8a16_matmul_ref(x, qweight, scale, bias=None) -> torch.Tensor:
    y = (x.float() @ qweight.float().T) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def w8a8_matmul_ref(x, qweight, scale, bias=None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token_ref(x2d)
    acc = int8_dot_exact(xq, qweight).to(torch.int32)  # what the kernel accumulates in int32
    y = acc.float() * xs[:, None] * scale.float()
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    # x: [M, K] float -> q: [M, K] int8, s: [M] fp32; one program per row
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + rk, mask=rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_row = tl.max(amax, axis=0)
    # div_rn: IEEE division like torch's tensor/tensor (CUDA's default fp32 "/" is approximate)
    inv = tl.where(amax_row > 0, tl.div_rn(127.0, tl.maximum(amax_row, 1e-30)), 0.0)
    scale = tl.div_rn(amax_row, 127.0)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + rk, mask=rk < K, other=0.0).to(tl.float32)
        p = x * inv
        if INTERPRETED:  # round half to even, like torch.round (libdevice is unavailable)
            f = tl.floor(p)
            d = p - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
            q = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
        else:
            q = libdevice.rint(p)  # a lone multiply, so no FMA contraction can change ties
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + rk, q.to(tl.int8), mask=rk < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def int8_to_float(w, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """int8 codes -> dtype. fp16: 1152 + w by putting w + 128 into the mantissa of 1024 (full-rate integer
    and float ops instead of the quarter-rate int -> float conversion), minus 1152; exact."""
    if UPCAST:
        return w.to(tl.float32).to(dtype)
    elif dtype == tl.float16:
        return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return w.to(dtype)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (M == 1 would specialize)
def _int8_kernel(
    # x: [M, K] float or int8, w: [N, K] int8, ws: [N], xs: [M] fp32, bias: [N], out: [M, N]
    x_ptr, w_ptr, ws_ptr, xs_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    ACT_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    if ACT_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = load_x(x_ptr, rm, rk, M, K, EVEN_K)  # [BM, BK]
        w = load_rows(w_ptr, rn, N, rk, K, K, EVEN_K, 0)  # [BN, BK] int8
        if ACT_INT8:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)  # int8 x int8 -> int32
        elif UPCAST:  # the interpreter cannot cast int8 to bf16
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc = tl.dot(x, tl.trans(int8_to_float(w, x_ptr.dtype.element_ty, UPCAST)), acc)
    y = acc.to(tl.float32)
    if ACT_INT8:
        y = y * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_out(out_ptr, y, bias_ptr, rm, rn, M, N, HAS_BIAS)


_prefill = tuned(_int8_kernel, PREFILL, INTERPRET_PREFILL, key=("M_BUCKET", "N", "K", "ACT_INT8"))
_decode = tuned(_int8_kernel, DECODE, INTERPRET_DECODE, key=("M_BUCKET", "N", "K", "ACT_INT8"))


@triton.jit
def _int8_gemv_kernel(
    # x: [1, K] float or int8, w: [N, K] int8, ws: [N], xs: [1] fp32, bias: [N], out: [1, N]
    x_ptr, w_ptr, ws_ptr, xs_ptr, bias_ptr, out_ptr,
    N, K,
    ACT_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # W8A16: code -> float as (2^23 + 128 + code) - (2^23 + 128), the integer added into the mantissa of
    # 2^23 (int -> float conversion runs at a quarter of the FMA rate); W8A8: exact int32 products.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    if ACT_INT8:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = load_rows(w_ptr, rn, N, rk, K, K, EVEN_K, 0).to(tl.int32)  # [BN, BK], 16-byte loads
        if EVEN_K:
            x = tl.load(x_ptr + rk)  # [BK]
        else:
            x = tl.load(x_ptr + rk, mask=rk < K, other=0)
        if ACT_INT8:
            acc += w * x.to(tl.int32)[None, :]
        elif UPCAST:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            wf = (w + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            acc += wf * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1).to(tl.float32)  # [BN]
    if ACT_INT8:
        y = y * tl.load(xs_ptr)
    y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    store_row(out_ptr, y, bias_ptr, rn, N, HAS_BIAS, SPLIT_K)


_gemv = tuned_gemv(_int8_gemv_kernel, GEMV, INTERPRET_GEMV, key=("N", "K", "SPLIT_K", "ACT_INT8"))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float, contiguous -> (xq int8 [M, K], x_scale fp32 [M]), Triton."""
    check(x.dim() == 2, f"expected x: [M, K], got shape {tuple(x.shape)}; reshape to 2-D first")
    x2d = check_activation(x, x.shape[-1])
    check_launchable(x)
    m, k = x2d.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _quant_per_token_kernel[(m,)](
            x2d, xq, xs, k, BLOCK=min(QUANT_BLOCK, triton.next_power_of_2(k)), INTERPRETED=INTERPRET
        )
    return xq, xs


def _check_int8(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    check(qweight.dim() == 2, f"qweight must be int8 [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_2d(qweight, "qweight", (n, k), torch.int8)
    check(
        scale.dtype in (torch.float16, torch.bfloat16, torch.float32),
        f"scale has dtype {scale.dtype}; expected a float dtype",
    )
    check(
        tuple(scale.shape) == (n,) and scale.is_contiguous(),
        f"scale must be a contiguous [N]=({n},) tensor, got {tuple(scale.shape)}",
    )
    return n, k


def _int8_matmul(x, qweight, scale, bias, act_int8: bool) -> torch.Tensor:
    n, k = _check_int8(qweight, scale)
    x2d = check_activation(x, k)
    check_bias(bias, n, x.dtype)
    check_launchable(x, qweight, scale, *([bias] if bias is not None else []))
    if act_int8:
        xin, xs = quantize_per_token(x2d)
    else:
        xin, xs = x2d, scale  # xs unused
    b = bias if bias is not None else scale
    if x2d.shape[0] == 1:
        # no split-K: measured on an H100, the int8 GEMV keeps every SM streaming without it, and the extra
        # memset + cast launches cost more than they save (4096 x 4096: 13.6 us without, 18.5 us with)
        y = launch_gemv(_gemv, xin, n, (qweight, scale, xs, b), out_dtype=x.dtype, split_k=False,
                        ACT_INT8=act_int8, HAS_BIAS=bias is not None)
        return y.reshape(*x.shape[:-1], n)
    y = launch_matmul(
        _decode,
        _prefill,
        xin,
        n,
        (qweight, scale, xs, b),
        out_dtype=x.dtype,
        ACT_INT8=act_int8,
        HAS_BIAS=bias is not None,
    )
    return y.reshape(*x.shape[:-1], n)


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x: [..., K] float @ (qweight * scale)^T (+ bias) -> [..., N], Triton."""
    return _int8_matmul(x, qweight, scale, bias, act_int8=False)


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """Quantize x per token to int8, int8 x int8 matmul with int32 accumulation, rescale -> [..., N], Triton."""
    return _int8_matmul(x, qweight, scale, bias, act_int8=True)
