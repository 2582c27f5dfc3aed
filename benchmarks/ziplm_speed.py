"""Re-time the models of a ZipLM benchmark run: its ZipLM and uniform model of every target against the dense one.

A run times each model in 3 back-to-back rounds while it searches; on this shared 2-core VM one slow round can move
that median by 10% or more. This script rebuilds the recorded architectures (the database's weights: a model's
latency depends on its shapes, not on its values, so the slow sequential OBS re-fit is skipped) and times each
against the dense model in more alternating pairs, for decode and prefill, with the run's clock, threads and prompt
length. Run it alone, on an idle machine. Writes benchmarks/results/NAME-speed.{json,md}.

    python benchmarks/ziplm_speed.py ziplm-removal-kl [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", help="results name of a ZipLM benchmark run (benchmarks/results/NAME.json)")
    ap.add_argument("--rounds", type=int, default=9, help="back-to-back (dense, model) pairs per measurement")
    ap.add_argument("--all-rounds", action="store_true",
                    help="also re-time the refinement rounds' models the run did not keep (where it records them)")
    ap.add_argument("--targets", default="", help="only these targets, e.g. 1.5 (default: all of the run)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-ziplm"), help="the run's work folder (database)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the run's results, and of this script's")
    args = ap.parse_args(argv)
    out = Path(args.results)
    path = out / f"{args.name}.json"
    if not path.exists():
        ap.error(f"no {path}: name a results file of benchmarks/ziplm.py (without .json)")
    run = json.loads(path.read_text())
    if run.get("benchmark") != "ziplm" or not run.get("results"):
        ap.error(f"{path.name} holds no ZipLM one-shot results")
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    settings = run.get("one_shot_settings", run["settings"])
    torch.set_num_threads(settings["threads"])

    from ziplm import bench_corpus, bench_database

    from llmcompress.hardware.profile import measure_speedup
    from llmcompress.models import load
    from llmcompress.prune.database import realise, realise_uniform
    from llmcompress.prune.ziplm_family import ZipLMConfig

    samples, seq_len = (8, 128) if settings.get("smoke") else (settings["num_samples"], 512)  # as ziplm.py
    t0 = time.perf_counter()
    graph = load("default")
    # the run's database; rebuilt (and kept in --work) when that folder is gone: a few minutes
    db = bench_database(graph, bench_corpus(graph).train_batches(samples, seq_len), ZipLMConfig(), Path(args.work))
    prompt = settings.get("table_prompt_len", 512)
    gen = 8 if settings.get("smoke") else 64  # decode steps timed, as the run (min(table gen_len, 64))
    rows = []
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    picked = [r for r in run["results"] if not targets or any(abs(r["target"] - t) < 1e-9 for t in targets)]
    if not picked:
        ap.error(f"--targets {args.targets}: the run has {', '.join(str(r['target']) for r in run['results'])}")
    for r in picked:
        u = r["uniform"]
        models = {"ziplm": (r["choice"], r["measured"])}
        if args.all_rounds:
            models |= {f"ziplm round {k + 1}": (x["choice"], x["measured_speedup"])
                       for k, x in enumerate(r.get("rounds", [])) if "choice" in x and not x.get("kept")}
        models["uniform"] = (None, u["measured"])
        for name, (choice, recorded) in models.items():
            model = (realise(graph, db, [tuple(c) for c in choice]) if choice is not None
                     else realise_uniform(graph, db, u["kv_groups"], u["ffn"]))
            row = {"target": r["target"], "model": name, "recorded_decode": recorded}
            for metric in ("decode", "prefill"):
                m = measure_speedup(graph, model, metric, 1, prompt, gen, args.rounds, settings["clock"])
                row[metric] = m
            rows.append(row)
            del model
    report = {"benchmark": "ziplm_speed", "commit": git_commit(), "machine": machine(), "run": args.name,
              "run_commit": run.get("one_shot_commit", run["commit"]), "rounds": args.rounds, "prompt_len": prompt,
              "clock": settings["clock"], "threads": settings["threads"], "rows": rows,
              "wall_s": time.perf_counter() - t0,
              "command": "python benchmarks/ziplm_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"# ZipLM run `{args.name}` re-timed\n",
             f"commit {report['commit']} (run at {report['run_commit']}), {report['machine']['cpu']}, "
             f"{settings['threads']} torch thread(s), {settings['clock']} clock, {args.rounds} back-to-back "
             f"(dense, model) pairs per figure, order alternating; decode: one step after a {prompt}-token prompt "
             f"(mean of {gen}), prefill: {prompt} tokens; {report['wall_s'] / 60:.1f} min\n",
             "| target | model | decode speed-up (median) | decode ratios min-max | recorded in the run | "
             "prefill speed-up | dense / model decode ms |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for row in rows:
        d, p = row["decode"], row["prefill"]
        lines.append(f"| {row['target']:g}x | {row['model']} | {d['speedup']:.3f}x | {min(d['ratios']):.3f}-"
                     f"{max(d['ratios']):.3f} | {row['recorded_decode']:.3f}x | {p['speedup']:.3f}x | "
                     f"{d['reference_ms']:.1f} / {d['model_ms']:.1f} |")
    spread = [statistics.pstdev(r["decode"]["ratios"]) for r in rows]
    lines += ["", f"- decode ratio standard deviation per model: {', '.join(f'{s:.3f}' for s in spread)}",
              f"- reproduce: `{report['command']}`"]
    md = "\n".join(lines) + "\n"
    js, mdp = write_results(f"{args.name}-speed", report, md, out=out)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
