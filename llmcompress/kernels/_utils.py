"""Helpers shared by the kernel files: interpreter detection, config tables, argument checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it is imported; the kernels then run on CPU tensors (numpy).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# M at or below this uses the decode path (BLOCK_M = 16, split-K); above it the prefill path.
DECODE_MAX_M = 16

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Shared by the three kernels that rebuild a weight tile in registers (2:4, int4, 2:4+int4); pruned to
# the candidates that won somewhere on the H100 (benchmarks/results/kernels-NVIDIA-H100-80GB-HBM3.json).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); BLOCK_K counts dense columns (>= 64).
UNPACK_PREFILL = [  # M = 17 .. DENSE_MIN_M - 1 by default: mid-size tiles
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 4, 8),
    (128, 256, 64, 3, 8),
]
UNPACK_DECODE = [  # M = 2 .. 16: one 16-row M tile, narrow N tiles so that every SM streams weight
    (16, 16, 256, 4, 4),
    (16, 16, 128, 8, 2),
    (16, 32, 256, 4, 4),
    (16, 16, 512, 3, 4),
    (16, 32, 128, 6, 4),
    (16, 16, 128, 6, 4),
]
UNPACK_INTERPRET_PREFILL = [(32, 32, 64, 1, 4)]
UNPACK_INTERPRET_DECODE = [(16, 32, 128, 1, 4)]


def configs(table, interpret_table) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) tuples -> triton Configs.

    LLMCOMPRESS_KERNEL_CONFIGS=first keeps only each table's first row: the GPU test run uses it so
    that every dtype / group size / flag combination compiles once instead of once per row.
    """
    rows = interpret_table if INTERPRET else table
    if os.environ.get("LLMCOMPRESS_KERNEL_CONFIGS") == "first":
        rows = rows[:1]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in rows
    ]


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, so prefill lengths share a tuned config."""
    return triton.next_power_of_2(max(int(m), 1))


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_launchable(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        check(t.device == dev, f"tensors are on different devices ({dev} and {t.device}); move them with .to({dev!s})")
    check(
        dev.type == "cuda" or INTERPRET,
        f"the Triton kernels need CUDA tensors (got {dev}); on CPU use the *_ref function, "
        "or set TRITON_INTERPRET=1 before triton is imported",
    )


def check_activation(x: torch.Tensor, k: int, name: str = "x") -> torch.Tensor:
    """x: [..., K] float, contiguous -> a 2-D view [M, K]."""
    check(x.dtype in FLOAT_DTYPES, f"{name} has dtype {x.dtype}; use float16, bfloat16 or float32 (x.half())")
    check(
        x.dim() >= 1 and x.shape[-1] == k,
        f"{name} has shape {tuple(x.shape)} but the weight expects K={k} in the last dim",
    )
    check(x.is_contiguous(), f"{name} is not contiguous; pass {name}.contiguous()")
    return x.reshape(-1, k)


def check_bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    if bias is None:
        return
    check(bias.shape == (n,), f"bias has shape {tuple(bias.shape)}; expected ({n},)")
    check(
        bias.dtype == dtype, f"bias dtype {bias.dtype} differs from the activation dtype {dtype}; use bias.to({dtype})"
    )
    check(bias.is_contiguous(), "bias is not contiguous; pass bias.contiguous()")


def check_2d(t: torch.Tensor, name: str, shape: tuple[int, int], dtype: torch.dtype | tuple) -> None:
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    check(t.dtype in dtypes, f"{name} has dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}")
    check(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    check(t.is_contiguous(), f"{name} is not contiguous; pass {name}.contiguous()")


def to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def launch_matmul(kernel_decode, kernel_prefill, x2d: torch.Tensor, n: int, args: tuple, out_dtype=None, **meta):
    """Launch a matmul kernel with signature (x, *args, out, M, N, K, M_BUCKET, <meta>, UPCAST, <tiles>).

    One launch and no split-K: y: [M, N] is written once in out_dtype (default: x's dtype), so a decode
    step costs a single kernel. Decode (M <= DECODE_MAX_M) and prefill use separately tuned tables.
    """
    m, k = x2d.shape
    out = torch.empty(m, n, device=x2d.device, dtype=out_dtype or x2d.dtype)
    if m == 0:
        return out

    def grid(c):
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

    kernel = kernel_decode if m <= DECODE_MAX_M else kernel_prefill
    kernel[grid](x2d, *args, out, m, n, k, m_bucket(m), UPCAST=INTERPRET, **meta)
    return out


def even_k(args) -> bool:
    """Heuristic for EVEN_K: K is a multiple of BLOCK_K, so loads along K need no mask (16-byte vectors)."""
    return args["K"] % args["BLOCK_K"] == 0


def tuned(kernel, table, interpret_table, key=("M_BUCKET", "N", "K")):
    """kernel with the EVEN_K heuristic, autotuned over a literal config table."""
    return triton.autotune(configs(table, interpret_table), key=list(key))(
        triton.heuristics({"EVEN_K": even_k})(kernel)
    )


@triton.jit
def load_x(x_ptr, rm, rk, M, K, EVEN_K: tl.constexpr):
    """x[rm, rk] -> [BM, BK], zero outside M and K."""
    ptr = x_ptr + rm[:, None] * K + rk[None, :]
    if EVEN_K:
        return tl.load(ptr, mask=rm[:, None] < M, other=0.0)
    return tl.load(ptr, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)


@triton.jit
def load_rows(ptr, rn, N, cols, n_cols, ld, EVEN_K: tl.constexpr, other):
    """ptr[rn, cols] of a row-major [N, ld] array -> [BN, BC], `other` outside N and n_cols."""
    p = ptr + rn[:, None] * ld + cols[None, :]
    if EVEN_K:
        return tl.load(p, mask=rn[:, None] < N, other=other)
    return tl.load(p, mask=(rn[:, None] < N) & (cols[None, :] < n_cols), other=other)


@triton.jit
def magic_float(u, dtype: tl.constexpr):
    """Small non-negative integers u (int32; < 1024 for fp16, < 128 for bf16) -> BASE + u in dtype,
    by OR-ing u into the mantissa of BASE (see magic_base): full-rate integer and float ops instead of
    the quarter-rate int -> float conversion. Subtract BASE (folded into a zero point) to get u."""
    if dtype == tl.float16:
        return (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif dtype == tl.bfloat16:
        return (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return (u | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def magic_base(dtype: tl.constexpr):
    if dtype == tl.float16:
        return 1024.0
    elif dtype == tl.bfloat16:
        return 128.0
    else:
        return 8388608.0


@triton.jit
def dot_t(acc, x, w, UPCAST: tl.constexpr):
    """acc [BM, BN] += x [BM, BK] @ w[BN, BK]^T (fp32 in the interpreter, whose half-precision dot is unreliable)."""
    if UPCAST:
        return acc + tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def store_out(out_ptr, acc, bias_ptr, rm, rn, M, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id on axis 0 -> (pid_m, pid_n), walking GROUP_M row tiles together for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# M == 1 (single-token decode): GEMV kernels on the CUDA cores. A [BLOCK_N, BLOCK_K] tile of packed
# weight rows is unpacked in the layout it was loaded in (no tensor-core operand shuffles, no
# padding of M to 16), multiplied by strided x loads that L1 serves, and reduced once per row.


def gemv_configs(table, interpret_table) -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K, num_warps) tuples -> triton Configs (no software pipelining: nothing to overlap
    but the next tile's loads, which long K tiles keep in flight instead)."""
    rows = interpret_table if INTERPRET else table
    if os.environ.get("LLMCOMPRESS_KERNEL_CONFIGS") == "first":
        rows = rows[:1]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=1, num_warps=w) for bn, bk, w in rows]


GEMV_SPLIT_MIN_N = 8192  # layers with fewer rows split K over several programs (see gemv_split)


def tuned_gemv(kernel, table, interpret_table, key=("N", "K", "SPLIT_K")):
    # reset_to_zero: split-K programs add into the output, which tuning runs must not leave dirty
    return triton.autotune(gemv_configs(table, interpret_table), key=list(key), reset_to_zero=["out_ptr"])(
        triton.heuristics({"EVEN_K": even_k})(kernel)
    )


def gemv_split(n: int, k: int) -> int:
    """Programs per row block along K. A 4096-row layer has too few rows to keep every SM streaming
    (measured: 4096 x 14336 took 1.9x the time of 14336 x 4096 at equal bytes), so short layers split K
    (up to 8 ways, at least 1024 columns each); the partial sums meet in an fp32 buffer (one memset
    and one cast launch more)."""
    return 1 if n >= GEMV_SPLIT_MIN_N else max(1, min(8, k // 1024))


def launch_gemv(kernel, x2d: torch.Tensor, n: int, args: tuple, out_dtype=None, split_k: bool = True, **meta):
    """x2d: [1, K] -> y: [1, N]; kernel signature (x, *args, out, N, K, <meta>, SPLIT_K, UPCAST, EVEN_K, <tiles>).

    split_k=False keeps one program per row block (int8: measured faster without the two extra launches)."""
    k = x2d.shape[1]
    out_dtype = out_dtype or x2d.dtype
    split = gemv_split(n, k) if split_k else 1
    if split == 1:
        out = torch.empty(1, n, device=x2d.device, dtype=out_dtype)
    else:
        out = torch.zeros(1, n, device=x2d.device, dtype=torch.float32)
    grid = lambda c: (triton.cdiv(n, c["BLOCK_N"]), split)  # noqa: E731
    kernel[grid](x2d, *args, out, n, k, SPLIT_K=split, UPCAST=INTERPRET, **meta)
    return out if split == 1 else out.to(out_dtype)


@triton.jit
def x_strided(x_ptr, cols, s: tl.constexpr, WIDTH: tl.constexpr, K, EVEN_K: tl.constexpr):
    """x[WIDTH * cols + s] as fp32 -> [BC] (zero past K): the s-th column of each packed column."""
    if EVEN_K:
        return tl.load(x_ptr + cols * WIDTH + s).to(tl.float32)
    return tl.load(x_ptr + cols * WIDTH + s, mask=cols * WIDTH + s < K, other=0.0).to(tl.float32)


@triton.jit
def store_row(out_ptr, y, bias_ptr, rn, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y: [BN] fp32 row sums -> out[rn] (+ bias); split-K programs add into an fp32 out instead."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y += bias if SPLIT_K == 1 else bias * (tl.program_id(1) == 0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(out_ptr + rn, y, mask=rn < N)


# ---------------------------------------------------------------------------------------------
# Large M (prefill): rebuilding the dense weight once and handing it to cuBLAS beats unpacking every
# tile inside a Triton GEMM once M is large (each tile would be unpacked cdiv(M, BLOCK_M) times).

DENSE_MIN_M = 128  # M at or above this: densify + torch.matmul (see launch_matmul's callers)
DENSIFY_BLOCK = (32, 128, 4)  # (BLOCK_N, BLOCK_K, num_warps) of the densify kernels


def use_dense(m: int, prefill: str) -> bool:
    """Whether an [m, K] input takes the densify + torch.matmul path; decode sizes (m <= DECODE_MAX_M)
    never do. The prefill choice is checked for every m, so a typo fails at once, not at the first prefill."""
    check(prefill in ("auto", "fused", "dense"), f"prefill={prefill!r}; use 'auto', 'fused' or 'dense'")
    return m > DECODE_MAX_M and (prefill == "dense" or (prefill == "auto" and m >= DENSE_MIN_M))


def launch_densify(kernel, n: int, k: int, args: tuple, dtype: torch.dtype, device, **meta) -> torch.Tensor:
    """kernel(*args, w_out, N, K, <meta>, UPCAST, EVEN_K, BLOCK_N, BLOCK_K) -> dense W: [N, K] in dtype."""
    bn, bk, warps = DENSIFY_BLOCK
    w = torch.empty(n, k, dtype=dtype, device=device)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    kernel[grid](*args, w, n, k, **meta, UPCAST=INTERPRET, EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return w


@triton.jit
def store_tile(w_ptr, w, rn, k0, N, K, BLOCK_K: tl.constexpr):
    """w: [BN, BK] -> w_ptr[rn, k0:k0+BK] of a row-major [N, K] array."""
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn[:, None] < N) & (rk[None, :] < K))
