"""Shared bits of the benchmarks: what machine and commit a result came from, and writing results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    if os.environ.get("LLMCOMPRESS_COMMIT"):  # set by benchmarks/gpu_session.sh: the lent machine's copy
        return os.environ["LLMCOMPRESS_COMMIT"]  # of the tree carries stale git metadata
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # a copy without git (the lent GPU machine)
        return os.environ.get("LLMCOMPRESS_COMMIT", "unknown")


def machine() -> dict:
    from llmcompress.evaluation import device_name

    info = {"cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def publish(name: str, report: dict, markdown: str, out: Path = RESULTS) -> int:
    """`write_results`, then show the table and where it went. -> 0 (a benchmark's exit status)"""
    js, md = write_results(name, report, markdown, out)
    print(markdown)
    print(f"written {js} and {md}")
    return 0


def write_results(name: str, report: dict, markdown: str, out: Path = RESULTS) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(json.dumps(report, indent=2) + "\n")
    md.write_text(markdown)
    return js, md
