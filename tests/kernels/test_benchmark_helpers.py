"""The GPU benchmark cannot run here; check that it imports, its arithmetic and its no-GPU exit."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"
_spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_peak_bandwidth_from_name():
    assert bench.known_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.known_peak_bandwidth("NVIDIA H100 SXM5 80GB") == 3.35e12
    assert bench.known_peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.known_peak_bandwidth("NVIDIA H100 PCIe") is None  # measured instead
    assert bench.known_peak_bandwidth("NVIDIA A100-SXM4-80GB") is None
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"


def test_bytes_and_metrics():
    n = k = 4096
    assert bench.weight_bytes("fp16", n, k) == 2 * n * k
    assert bench.weight_bytes("sparse24", n, k) == n * k + n * k // 8  # half the fp16 values + 2 bits each
    assert bench.weight_bytes("int4", n, k) == n * k // 2 + 3 * n * k // 128
    assert bench.weight_bytes("sparse24_int4", n, k) == n * k // 4 + n * k // 8 + 3 * n * k // 128
    m, seconds, peak = 16, 20e-6, 3.35e12
    r = bench.metrics(m, n, k, "fp16", seconds, peak)
    moved = 2 * n * k + 2 * m * k + 2 * m * n
    assert r["time_us"] == pytest.approx(20.0)
    assert r["tflops"] == pytest.approx(2 * m * n * k / seconds / 1e12)
    assert r["gbs"] == pytest.approx(moved / seconds / 1e9)
    assert r["roofline"] == pytest.approx(moved / seconds / peak)


def test_markdown_rows():
    row = {"n": 4096, "k": 4096, "m": 1, "kernel": "ours 2:4", "format": "sparse24", "max_rel_err": 1e-4}
    row.update(bench.metrics(1, 4096, 4096, "sparse24", 10e-6, 3.35e12), speedup=1.5)
    skipped = {"n": 4096, "k": 4096, "m": 1, "kernel": "torch._int_mm", "error": "failed: RuntimeError"}
    settings = dict(
        torch="x", triton="y", dtype="float16", group_size=128, peak_bw_tbs=3.35, peak_bw_source="datasheet", reps=30
    )
    md = bench.markdown({"gpu": "NVIDIA H100", "commit": "abc", "settings": settings, "results": [row, skipped]})
    assert "| 4096x4096 | 1 | ours 2:4 | 10.0 |" in md and "1.50x" in md
    assert "| torch._int_mm | failed: RuntimeError |" in md
    assert md.count("\n|") == 4  # header, rule, two rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_exits_2_without_cuda(capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
