"""GKD settings pilot: short GKD runs on the 1.5x Puzzle architecture, to pick the loss and lr of the long run.

    python benchmarks/puzzle_gkd_pilot.py [--steps 24] [--variants base,lr3e-4,lm0.5,nocos,lm0.5+mse]

Needs the run folder of `benchmarks/puzzle.py` (library, BLD blocks, scores: runs/bench-puzzle/puzzle) and the
1.5x solution recorded in benchmarks/results/puzzle-1.5.json. For each variant it assembles that solution from
the BLD blocks, runs `train_gkd` for --steps steps of 4 x 256 tokens (its own cosine lr schedule, so each is a
complete miniature run), and reports the mean KL of the last 8 steps and the held-out perplexity on 16 windows of
512 tokens (the last 200 rows of calib_wikihow.jsonl, as in puzzle.py). A short horizon favours larger learning
rates, so a loss setting that loses here is unlikely to win at 10x the tokens; one that wins by a few percent
may not hold. Writes benchmarks/results/puzzle-gkd-pilot.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402

VARIANTS = {  # name -> GKDConfig overrides (base: the recipe's loss, 1.0 cosine + 1.0 KL, lr 1e-4)
    "base": {},
    "lr3e-4": {"lr": 3e-4},
    "lm0.5": {"lm_weight": 0.5},
    "nocos": {"cosine_weight": 0.0},
    "lm0.5+mse": {"lm_weight": 0.5, "mse_weight": 1.0},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-puzzle" / "puzzle"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmcompress.data import Corpus, DataConfig
    from llmcompress.evaluation import perplexity
    from llmcompress.models import load
    from llmcompress.puzzle import BlockLibrary, load_library
    from llmcompress.puzzle.gkd import GKDConfig, assemble, train_gkd
    from llmcompress.puzzle.score import block_of
    from llmcompress.stages.puzzle import SCORED

    work = Path(args.work)
    sol = json.loads((RESULTS / "puzzle-1.5.json").read_text())["runs"][0]["mip"]["solutions"][0]["blocks"]
    parent = load("default")
    data = DataConfig(source=str(ROOT.parent / "shared" / "data" / "calib_wikihow.jsonl"), heldout_rows=200,
                      seq_len=256)
    corpus = Corpus(data, parent.tokenizer)
    tokens, stream = corpus.train_batches(1024), corpus.heldout_stream()  # tokens: [1024, 256]
    lib, library = load_library(work / SCORED), BlockLibrary.load(work / "library")
    rows = []
    for name in args.variants.split(","):
        student, _ = assemble(parent, library, [block_of(lib, n) for n in sol], work / "bld")
        cfg = GKDConfig(tokens=args.steps * 1024, num_samples=1024, batch_size=4, lr=1e-4, **VARIANTS[name])
        t0 = time.perf_counter()
        hist = train_gkd(parent, student, tokens, cfg, None)["history"]
        ppl = perplexity(student, stream, 512, 16)["perplexity"]
        rows.append({"variant": name, **VARIANTS[name], "steps": args.steps,
                     "kl_last8": sum(h["kl"] for h in hist[-8:]) / len(hist[-8:]), "ppl16": ppl,
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del student
    md = (f"# GKD settings pilot (1.5x Puzzle architecture)\n\ncommit {git_commit()}, {machine()['cpu']}, "
          f"{args.threads} threads\n\n| variant | steps | KL (last 8 steps) | held-out ppl (16 x 512) | seconds |\n"
          "|---|--:|--:|--:|--:|\n"
          + "".join(f"| {r['variant']} | {r['steps']} | {r['kl_last8']:.3f} | {r['ppl16']:.2f} | {r['seconds']:.0f} |\n"
                    for r in rows))
    write_results("puzzle-gkd-pilot", {"benchmark": "puzzle-gkd-pilot", "commit": git_commit(), "machine": machine(),
                                       "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
