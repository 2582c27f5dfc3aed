"""Quickstart benchmark: the teacher vs the layer-pruned model (params, held-out perplexity, speed).

Runs recipes/quickstart.yaml from scratch (its own run folder under runs/) and writes
benchmarks/results/quickstart.json and .md.  Usage: python benchmarks/quickstart.py [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_commit, machine, write_results  # noqa: E402

from llmcompress.pipeline import load_recipe, markdown_table, run_recipe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--output", default=str(ROOT / "runs" / "bench-quickstart"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = ROOT.parent / "shared" / "data" / "calib_wikihow.jsonl"
    overrides = [f"output={args.output}", f"data.source={data}"] + args.set
    recipe, base = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    t0 = time.perf_counter()
    result = run_recipe(recipe, base, overwrite=True)
    wall = time.perf_counter() - t0
    prune = next(s for s in result.stages if s.type == "prune_layers")
    report = {
        "benchmark": "quickstart", "commit": git_commit(), "machine": machine(), "wall_s": wall,
        "recipe": recipe.model_dump(), "overrides": overrides, "removed_layers": prune.report["removed_layers"],
        "stages": [{"stage": s.label, "type": s.type, "seconds": s.seconds} for s in result.stages],
        "rows": result.summary,
    }
    cols = ["stage", "model", "params", "perplexity", "decode_tok_s", "prefill_ms", "mc_epistemic_reasoning.acc"]
    rows = result.summary
    m = report["machine"]
    md = (f"# Quickstart: teacher vs layer-pruned\n\n"
          f"commit {report['commit']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}; "
          f"whole run {wall / 60:.1f} min\n\n"
          + markdown_table(rows, cols) + "\n\n"
          f"- removed layers: {prune.report['removed_layers']} "
          f"(KL after pruning on calibration: {prune.report['kl_after']:.3f})\n"
          f"- perplexity: {rows[0].get('ppl_protocol', '')}\n"
          f"- speed: {rows[0].get('speed_setting', '')}\n"
          f"- task accuracy: first {recipe.stages[0].task_limit} rows of mc_epistemic_reasoning (chance 0.5)\n"
          f"- reproduce: `python benchmarks/quickstart.py` (or `make bench`)\n")
    js, mdp = write_results("quickstart", report, md)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
