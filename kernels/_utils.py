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


def prefill_configs(table, interpret_table) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) tuples -> triton Configs (SPLIT_K = 1)."""
    rows = interpret_table if INTERPRET else table
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in rows
    ]


def decode_configs(table, interpret_table) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_stages, num_warps) tuples -> triton Configs."""
    rows = interpret_table if INTERPRET else table
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_stages=s, num_warps=w)
        for bm, bn, bk, sk, s, w in rows
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

    Decode (M <= DECODE_MAX_M) accumulates split-K partial sums into an fp32 buffer with atomics;
    prefill stores directly. Returns y: [M, N] in out_dtype (default: x's dtype).
    """
    m, k = x2d.shape
    out_dtype = out_dtype or x2d.dtype
    decode = m <= DECODE_MAX_M
    alloc = torch.zeros if decode else torch.empty
    out = alloc(m, n, device=x2d.device, dtype=torch.float32 if decode else out_dtype)

    def grid(c):
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])

    kernel = kernel_decode if decode else kernel_prefill
    kernel[grid](x2d, *args, out, m, n, k, m_bucket(m), UPCAST=INTERPRET, **meta)
    return out.to(out_dtype)


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
