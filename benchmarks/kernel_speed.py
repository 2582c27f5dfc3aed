"""Benchmark our Triton kernels against torch (cuBLAS fp16, cuSPARSELt 2:4, int8 _int_mm).

    python benchmarks/kernel_speed.py [--out benchmarks/results] [--ms 1 4 16 64 2048] [--budget-s 270]

Llama-3-8B linear shapes (N x K: out x in) for each M; fp16 activations. For every kernel it reports
the median time over repeated CUDA-graph replays (CUDA events, L2 flushed before each run, after
warm-up and autotuning; the eagerly launched time is kept as eager_us), TFLOP/s (dense-equivalent 2*M*N*K), GB/s (weights as stored + activations + output)
and the fraction of the card's memory-bandwidth roofline. Writes
benchmarks/results/kernels-<gpu>.json and .md. Without CUDA it exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, write_results  # noqa: E402  (shared with the other benchmarks)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): qkv/o-like, up/gate, down
MS = [1, 4, 16, 64, 2048]
GROUP_SIZE = 128
DECODE_MAX_M = 16  # llmcompress.kernels._utils.DECODE_MAX_M (not imported: this file must load without CUDA)
PEAK_BW_TBS = {"H200": 4.8, "H100 SXM": 3.35}  # HBM bandwidth of known cards, TB/s


# ---------------------------------------------------------------------------------------------
# helpers that need no GPU


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def known_peak_bandwidth(name: str) -> float | None:
    """Datasheet HBM bandwidth in bytes/s from the device name, or None when unknown."""
    if "H200" in name:
        return PEAK_BW_TBS["H200"] * 1e12
    if "H100" in name and ("SXM" in name or "HBM3" in name):  # the SXM part reports "H100 80GB HBM3"
        return PEAK_BW_TBS["H100 SXM"] * 1e12
    return None


def weight_bytes(fmt: str, n: int, k: int, group_size: int = GROUP_SIZE) -> int:
    """Bytes a kernel must read for the weight of an [N, K] layer in format fmt."""
    groups = n * (k // group_size)
    meta = n * -(-k // 32) * 4
    return {
        "fp16": 2 * n * k,
        "sparse24": n * k + meta,  # fp16 values [N, K/2] + int32 metadata
        "int4": n * k // 2 + 2 * groups + groups,  # nibbles + fp16 scales + uint8 zeros
        "int8": n * k + 2 * n,
        "sparse24_int4": n * k // 4 + meta + 3 * groups,
    }[fmt]


def metrics(m: int, n: int, k: int, fmt: str, seconds: float, peak_bw: float, act_bytes: int = 2) -> dict:
    moved = weight_bytes(fmt, n, k) + act_bytes * m * k + 2 * m * n
    return {
        "time_us": seconds * 1e6,
        "tflops": 2 * m * n * k / seconds / 1e12,
        "gbs": moved / seconds / 1e9,
        "roofline": moved / seconds / peak_bw,
    }


def config_label(c) -> str:
    """{'BLOCK_M': 16, ..., 'num_warps': 4, 'num_stages': 3} -> '16x32x256 s3 w4'."""
    if not isinstance(c, dict):
        return "" if c is None else str(c)
    tiles = "x".join(str(c.get(f"BLOCK_{d}", "?")) for d in "MNK")
    return f"{tiles} s{c.get('num_stages', '?')} w{c.get('num_warps', '?')}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Kernel benchmark on {report['gpu']}",
        "",
        f"commit `{report['commit']}`, torch {s['torch']}, triton {s['triton']}, {s['dtype']} activations, "
        f"int4 group size {s['group_size']}, peak bandwidth {s['peak_bw_tbs']:.2f} TB/s ({s['peak_bw_source']}), "
        f"median of {s['reps']} CUDA-graph replays with L2 flushed (no Python launch overhead).",
        "",
        "| N x K | M | kernel | time (us) | TFLOP/s | GB/s | % BW roofline | vs cuBLAS | max rel err | tuned config |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        head = f"| {r['n']}x{r['k']} | {r['m']} | {r['kernel']} |"
        if "time_us" not in r:
            lines.append(f"{head} {r.get('error', 'n/a')} | | | | | | |")
            continue
        err = "" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}"
        lines.append(
            f"{head} {r['time_us']:.1f} | {r['tflops']:.1f} | {r['gbs']:.0f} | {100 * r['roofline']:.0f}% | "
            f"{r.get('speedup', float('nan')):.2f}x | {err} | {config_label(r.get('config'))} |"
        )
    return "\n".join(lines) + "\n"


def import_kernels():
    """llmcompress.kernels, also from a checkout that was not pip-installed (the checkout's root on the path)."""
    if importlib.util.find_spec("llmcompress") is None:
        sys.path.append(str(ROOT))  # after site-packages: the root must not shadow installed packages
    from llmcompress.kernels import int8, sparse24_matmul, sparse24_pack, sparse24_w4a16, w4a16

    return int8, sparse24_matmul, sparse24_pack, sparse24_w4a16, w4a16


# ---------------------------------------------------------------------------------------------
# GPU side


class Timer:
    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2

    def _median(self, run) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3

    def __call__(self, fn) -> tuple[float, float]:
        """(median seconds of a CUDA-graph replay of fn, median seconds of fn launched eagerly), each
        run after an L2 flush. The graph removes Python launch overhead, as a serving engine's decode
        loop does; the eager figure is what a plain Python caller sees."""
        for _ in range(self.warmup):
            fn()
        eager = self._median(fn)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
        except Exception:  # noqa: BLE001  (an op that cannot be captured: the eager time stands)
            torch.cuda.synchronize()
            return None, eager
        return self._median(graph.replay), eager


def measured_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    _, seconds = Timer(reps=10, warmup=3)(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds


def candidates(n: int, k: int, mods) -> tuple[list, dict, dict]:
    """[(kernel name, weight format, make(x) -> callable or the setup error, activation bytes)],
    {kernel name: reference(x)} and {kernel name: (decode autotuner, prefill autotuner)} for one shape."""
    int8, sp_mm, sp_pack, sp_w4, w4 = mods
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
    w24 = sp_pack.prune_24(w)
    values, meta = sp_pack.compress_24(w24)
    q4 = w4.quantize_int4(w, GROUP_SIZE, symmetric=False)
    q8, s8 = int8.quantize_int8(w)
    q24_4 = sp_w4.quantize_sparse24_int4(w24, GROUP_SIZE, symmetric=False)
    out = [("torch fp16 (cuBLAS)", "fp16", lambda x: lambda: torch.nn.functional.linear(x, w), 2)]
    try:
        w_semi = torch.sparse.to_sparse_semi_structured(w24)
        out.append(
            (
                "torch 2:4 to_sparse_semi_structured",
                "sparse24",
                lambda x: lambda: torch.nn.functional.linear(x, w_semi),
                2,
            )
        )
    except Exception as e:  # noqa: BLE001  (unsupported build or card: reported, not fatal)
        out.append(("torch 2:4 to_sparse_semi_structured", "sparse24", e, 2))
    try:
        w_cslt = torch._cslt_compress(w24)
        out.append(
            (
                "torch._cslt_sparse_mm (cuSPARSELt)",
                "sparse24",
                lambda x: lambda: torch._cslt_sparse_mm(w_cslt, x.t()),
                2,
            )
        )
    except Exception as e:  # noqa: BLE001
        out.append(("torch._cslt_sparse_mm (cuSPARSELt)", "sparse24", e, 2))

    def int_mm(x):
        xq, _ = int8.quantize_per_token(x)
        return lambda: torch._int_mm(xq, q8.t())

    out += [
        ("torch._int_mm int8 (x pre-quantized)", "int8", int_mm, 1),
        ("ours 2:4", "sparse24", lambda x: lambda: sp_mm.sparse24_matmul(x, values, meta), 2),
        (f"ours W4A16 g{GROUP_SIZE} asym", "int4", lambda x: lambda: w4.w4a16_matmul(x, *q4, GROUP_SIZE), 2),
        ("ours W8A16", "int8", lambda x: lambda: int8.w8a16_matmul(x, q8, s8), 2),
        ("ours W8A8 (incl. x quant)", "int8", lambda x: lambda: int8.w8a8_matmul(x, q8, s8), 2),
        (
            f"ours 2:4+W4A16 g{GROUP_SIZE}",
            "sparse24_int4",
            lambda x: lambda: sp_w4.sparse24_w4a16_matmul(x, *q24_4, GROUP_SIZE),
            2,
        ),    ]
    prefill = DECODE_MAX_M + 1  # the two prefill paths side by side (the rows above use prefill="auto")
    for mode, label in (("fused", "fused Triton GEMM"), ("dense", "Triton densify + cuBLAS")):
        out += [
            (f"ours 2:4 [{label}]", "sparse24",
             lambda x, p=mode: lambda: sp_mm.sparse24_matmul(x, values, meta, prefill=p), 2, prefill),
            (f"ours W4A16 g{GROUP_SIZE} asym [{label}]", "int4",
             lambda x, p=mode: lambda: w4.w4a16_matmul(x, *q4, GROUP_SIZE, prefill=p), 2, prefill),
            (f"ours 2:4+W4A16 g{GROUP_SIZE} [{label}]", "sparse24_int4",
             lambda x, p=mode: lambda: sp_w4.sparse24_w4a16_matmul(x, *q24_4, GROUP_SIZE, prefill=p), 2, prefill),
        ]
    refs = {  # what each kernel should compute, for a correctness check in fp32
        "ours 2:4": lambda x: sp_mm.sparse24_matmul_ref(x, values, meta),
        f"ours W4A16 g{GROUP_SIZE} asym": lambda x: w4.w4a16_matmul_ref(x, *q4, GROUP_SIZE),
        "ours W8A16": lambda x: int8.w8a16_matmul_ref(x, q8, s8),
        "ours W8A8 (incl. x quant)": lambda x: int8.w8a8_matmul_ref(x, q8, s8),
        f"ours 2:4+W4A16 g{GROUP_SIZE}": lambda x: sp_w4.sparse24_w4a16_matmul_ref(x, *q24_4, GROUP_SIZE),
    }
    tuners = {  # (M == 1 GEMV, decode, prefill) autotuners behind each of our kernels
        "ours 2:4": (sp_mm._gemv, sp_mm._decode, sp_mm._prefill),
        f"ours W4A16 g{GROUP_SIZE} asym": (w4._gemv, w4._decode, w4._prefill),
        "ours W8A16": (int8._gemv, int8._decode, int8._prefill),
        "ours W8A8 (incl. x quant)": (int8._gemv, int8._decode, int8._prefill),
        f"ours 2:4+W4A16 g{GROUP_SIZE}": (sp_w4._gemv, sp_w4._decode, sp_w4._prefill),
    }
    return out, refs, tuners


def run(args) -> dict:
    import triton

    mods = import_kernels()
    from llmcompress.kernels._utils import DENSE_MIN_M as dense_min_m

    name = torch.cuda.get_device_name()
    peak = known_peak_bandwidth(name)
    source = "datasheet"
    if peak is None:
        peak, source = measured_bandwidth(), "measured 1 GiB device copy"
    timer = Timer(reps=args.reps, warmup=args.warmup)
    t_start = time.perf_counter()
    results = []
    for n, k in SHAPES:
        kernels, refs, tuners = candidates(n, k, mods)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = None
            for kname, fmt, make, act_bytes, *min_m in kernels:
                if min_m and m < min_m[0]:
                    continue
                row = {"n": n, "k": k, "m": m, "kernel": kname, "format": fmt}
                results.append(row)
                if time.perf_counter() - t_start > args.budget_s:
                    row["error"] = "skipped (time budget)"
                    continue
                if isinstance(make, Exception):
                    row["error"] = f"unavailable: {type(make).__name__}"
                    continue
                try:
                    fn = make(x)
                    y = fn()  # compiles and autotunes
                    base_name = kname.split(" [")[0]
                    if base_name in refs:
                        ref = refs[base_name](x).float()
                        row["max_rel_err"] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    seconds, eager = timer(fn)
                    row["eager_us"] = round(eager * 1e6, 2)  # launched from Python each time, for reference
                    if seconds is None:
                        seconds, row["timing"] = eager, "eager (CUDA graph capture failed)"
                    dense_path = "densify" in kname or ("[" not in kname and m >= dense_min_m and fmt != "int8")
                    tuner = None if dense_path else tuners.get(base_name)
                    if tuner is not None:  # the autotuned config this shape and M ran with
                        tuner = tuner[0] if m == 1 else tuner[1] if m <= DECODE_MAX_M else tuner[2]
                        chosen = tuner.best_config
                        row["config"] = chosen.all_kwargs() if hasattr(chosen, "all_kwargs") else str(chosen)
                        timings = getattr(tuner, "configs_timings", None) or {}
                        row["config_timings_us"] = {  # the autotuner's own medians (ms -> us), every candidate
                            config_label(c.all_kwargs()): round(1e3 * (t[0] if isinstance(t, (list, tuple)) else t), 2)
                            for c, t in timings.items()
                        }
                except Exception as e:  # noqa: BLE001  (e.g. a shape the torch op rejects)
                    row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    continue
                row.update(metrics(m, n, k, fmt, seconds, peak, act_bytes))
                base = row["time_us"] if kname.startswith("torch fp16") else base
                row["speedup"] = base / row["time_us"] if base else float("nan")
            del x
    return {
        "gpu": name,
        "commit": git_commit(),
        "settings": {
            "dtype": "float16",
            "shapes_nk": SHAPES,
            "ms": args.ms,
            "group_size": GROUP_SIZE,
            "reps": args.reps,
            "timing": "CUDA-graph replay after an L2 flush (eager_us: Python launch each time)",
            "dense_prefill_min_m": dense_min_m,
            "warmup": args.warmup,
            "peak_bw_tbs": peak / 1e12,
            "peak_bw_source": source,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU and none is available; nothing was measured.",
              file=sys.stderr)
        return 2
    report = run(args)
    js, md = write_results(f"kernels-{gpu_slug(report['gpu'])}", report, markdown(report), args.out)
    print(f"wrote {js} and {md} ({report['settings']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
