"""ZipLM benchmark: structured OBS pruning to several decode speed-ups vs uniform width pruning (Minitron-style).

Default model on this machine's CPU. Calibration on the first 800 rows of ../shared/data/calib_wikihow.jsonl,
held-out perplexity on the last 200. One database, one DP search per target over the cost table profiled here,
measured speed-ups of the realised models (same clock and threads as the table), the uniform baseline at the
same budget, then optionally global distillation (per-layer hidden cosine + logit KL, `puzzle.gkd.train_gkd`)
with the same token budget for both. Writes benchmarks/results/ziplm.{json,md}.

    python benchmarks/ziplm.py [--threads 1] [--speedups 1.25,1.5,2.0] [--distill-tokens 0] [--smoke]

A run's one-shot phase (profile, database, search, measurements) takes most of an hour; `--reuse NAME` takes it from
benchmarks/results/NAME.json instead: the models are rebuilt from the recorded choices (checked against the recorded
perplexity), the distilled rows already there are kept, and only the models still missing are distilled:

    python benchmarks/ziplm.py --reuse ziplm-search --distill-tokens 294912 --distill-targets 1.25 --distill-models uniform
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402

import torch  # noqa: E402


def bench_corpus(graph):
    """The benchmark's corpus: the shared calibration file, its last 200 rows held out."""
    from llmcompress.data import Corpus, DataConfig
    from llmcompress.models.loading import cache_dir

    data = ROOT.parent / "shared" / "data" / "calib_wikihow.jsonl"
    return Corpus(DataConfig(source=str(data), heldout_rows=200, seq_len=512), graph.tokenizer, cache=cache_dir())


def bench_database(graph, tokens, cfg, work: Path):
    """The run's OBS database (built once in WORK/database-{samples}x{seq_len}, loaded after)."""
    from llmcompress.prune.database import build_database, default_levels

    samples, seq_len = tokens.shape
    levels = default_levels(graph.config.intermediate_size, cfg.ffn_steps, cfg.ffn_multiple)
    return build_database(graph, tokens, levels, folder=work / f"database-{samples}x{seq_len}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="process", help="cost-table and measurement clock: process or wall")
    ap.add_argument("--speedups", default="1.25,1.5,2.0")
    ap.add_argument("--metric", default="decode", choices=["decode", "prefill"])
    ap.add_argument("--num-samples", type=int, default=64, help="calibration sequences of 512 tokens")
    ap.add_argument("--ppl-windows", type=int, default=64, help="held-out perplexity windows of 512 tokens")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--normalise", default="output", choices=["residual", "output", "none"],
                    help="how per-layer OBS errors are made comparable across layers")
    ap.add_argument("--search-steps", type=int, default=0,
                    help="sensitivity-search steps per target (SPDY-style weights on the DP's errors; 0: plain DP)")
    ap.add_argument("--measure-rounds", type=int, default=3,
                    help="back-to-back (dense, pruned) timing pairs per measured speed-up (median ratio)")
    ap.add_argument("--error-scale", default="none", choices=["none", "removal_kl"],
                    help="removal_kl: rescale each part's OBS errors to the dense model's KL without that part")
    ap.add_argument("--search-threads", type=int, default=0,
                    help="torch threads of the sensitivity search (0: --threads); latencies always use --threads")
    ap.add_argument("--name", default="", help="results file name under benchmarks/results (default: ziplm, or the "
                                                   "--reuse name)")
    ap.add_argument("--reuse", default="",
                    help="results name of an earlier run whose one-shot phase (and distilled rows) are reused; its "
                         "one-shot settings replace this command's")
    ap.add_argument("--redistill", action="store_true",
                    help="with --reuse: distill the --distill-models again even where the reused run has them "
                         "(to time a budget on the same day as its comparison)")
    ap.add_argument("--distill-tokens", type=int, default=0, help="GKD token budget per model (0: one-shot only)")
    ap.add_argument("--distill-targets", default="1.25,1.5", help="targets whose models are distilled")
    ap.add_argument("--distill-models", default="ziplm,uniform",
                    help="which models of a target to distill: ziplm, uniform or both (a long budget for ZipLM "
                         "alone fits one session; the comparison with uniform can use a shorter one)")
    ap.add_argument("--distill-lm", type=float, default=0.0,
                    help="weight of the student's LM loss added to the distillation loss (0: cosine + KL only)")
    ap.add_argument("--gradual-tokens", type=int, default=0,
                    help="also run gradual mode (targets in sequence, distilled from dense after each) with this "
                         "many distillation tokens per target (0: skip)")
    ap.add_argument("--train-threads", type=int, default=0,
                    help="torch threads while distilling (0: same as --threads); latencies always use --threads")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-ziplm"))
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the script end to end")
    args = ap.parse_args(argv)
    which = {m.strip() for m in args.distill_models.split(",")}
    if which - {"ziplm", "uniform"}:  # checked before the one-shot phase, not after its half hour
        ap.error(f"--distill-models {args.distill_models!r}: name ziplm, uniform or ziplm,uniform")
    if args.distill_lm < 0:
        ap.error(f"--distill-lm {args.distill_lm:g}: a loss weight is 0 or more")
    if args.measure_rounds < 1:
        ap.error(f"--measure-rounds {args.measure_rounds}: time at least one (dense, pruned) pair")
    prior = None
    out = Path(args.work) if args.smoke else RESULTS  # smoke results stay out of benchmarks/results
    if args.reuse:
        path = out / f"{args.reuse}.json"
        if not path.exists():
            ap.error(f"--reuse {args.reuse}: no {path}; name a results file of an earlier run (without .json)")
        if args.gradual_tokens:
            ap.error("--gradual-tokens prunes from scratch: run it without --reuse")
        prior = json.loads(path.read_text())
        if prior.get("benchmark") != "ziplm" or not prior.get("results") or prior["settings"]["smoke"] != args.smoke:
            ap.error(f"--reuse {args.reuse}: {path.name} holds no ZipLM one-shot results"
                     + (" of a --smoke run" if args.smoke else " of a full run"))
        for key in ONE_SHOT_KEYS:  # the rebuilt models are the recorded ones only under the recorded settings
            setattr(args, key, prior["settings"].get(key, ONE_SHOT_DEFAULTS.get(key)))
    args.name = args.name or args.reuse.removesuffix("-smoke") or "ziplm"
    torch.set_num_threads(args.threads)

    from llmcompress.evaluation import perplexity
    from llmcompress.hardware.profile import load_table, save_table
    from llmcompress.models import load
    from llmcompress.models.graph import count_params
    from llmcompress.prune.database import realise, realise_uniform
    from llmcompress.prune.ziplm_family import (ZipLMConfig, measure_latency, measured_speedup, profile_for,
                                                 prune_family)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    speedups = [float(s) for s in args.speedups.split(",")]
    seq_len, samples, windows = (128, 8, 4) if args.smoke else (512, args.num_samples, args.ppl_windows)
    cfg = ZipLMConfig(speedups=speedups, metric=args.metric, num_samples=samples, seq_len=seq_len,
                      refine=args.refine, normalise=args.normalise, search_steps=args.search_steps,
                      error_scale=args.error_scale, measure_rounds=args.measure_rounds,
                      search_threads=args.search_threads, **(dict(search_seq_len=64, search_positions=16)
                                                             if args.smoke else {}))
    graph = load("default")
    corpus = bench_corpus(graph)
    tokens = corpus.train_batches(samples, seq_len)
    heldout = corpus.heldout_stream()

    def ppl(model) -> float:
        return perplexity(model, heldout, 512, max_windows=windows)["perplexity"]

    timings = {}
    t0 = time.perf_counter()
    if prior is not None:
        one_shot = prior.get("one_shot_settings", prior["settings"])
        table_info = {"device": one_shot["cost_table_device"], "clock": one_shot["table_clock"],
                      # results written before this field was recorded were all profiled with 512-token prompts
                      "prompt_len": one_shot.get("table_prompt_len", 512)}
        db = bench_database(graph, tokens, cfg, work)
        dense, results = prior["dense"], []
        for r in prior["results"]:
            choice = [tuple(c) for c in r["choice"]]
            zmodel = realise(graph, db, choice, tokens if cfg.sequential else None, cfg.batch_size)
            u = r["uniform"]
            umodel = realise_uniform(graph, db, u["kv_groups"], u["ffn"])
            for what, model, want in (("ZipLM", zmodel, r["perplexity"]), ("uniform", umodel, u["perplexity"])):
                got = ppl(model)
                if abs(got / want - 1) > 0.005:
                    raise SystemExit(f"--reuse {args.reuse}: the rebuilt {what} {r['target']:g}x model has "
                                     f"perplexity {got:.3f}, recorded {want:.3f}; the code or data changed since "
                                     "that run: rerun its one-shot phase")
            results.append((r, zmodel, umodel))
        timings = prior["timings"] | {"rebuild_s": time.perf_counter() - t0}
        return finish(args, argv, prior, cfg, graph, corpus, ppl, dense, results, table_info, timings, which,
                      samples, seq_len, windows, work, t_all)
    table_path = work / f"cost_table-{args.clock}-{args.threads}t{'-smoke' if args.smoke else ''}.json"
    if table_path.exists():
        table = load_table(table_path)
    else:
        table = profile_for(graph, cfg, clock=args.clock,
                            **(dict(repeats=1, warmup=0, prompt_len=64, gen_len=8) if args.smoke else {}))
        save_table(table, table_path, overwrite=True)
    timings["profile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    db = bench_database(graph, tokens, cfg, work)
    timings["database_s"] = time.perf_counter() - t0
    from llmcompress.hardware.cost_model import CostModel

    t0 = time.perf_counter()
    rows = prune_family(graph, db, CostModel(table), cfg, tokens, measure=True, uniform=True)
    timings["search_realise_measure_s"] = time.perf_counter() - t0

    table_info = {"device": table.device, "clock": table.settings.clock, "prompt_len": table.settings.prompt_len}
    dense = {"params": count_params(graph), "perplexity": ppl(graph),
             "latency_ms": measure_latency(graph, cfg.metric, cfg.batch, table)}
    other = "prefill" if cfg.metric == "decode" else "decode"
    dense[f"{other}_ms"] = measure_latency(graph, other, cfg.batch, table)  # reported beside the dense latency
    results = []
    for row in rows:
        uni = row["uniform"]
        r = {"target": row["target_speedup"], "predicted": row["predicted_speedup"],
             "measured": row["measured_speedup"], "params": row["params"], "perplexity": ppl(row["model"]),
             f"measured_{other}": measured_speedup(graph, row["model"], other, cfg.batch, table,
                                                   cfg.measure_rounds)["speedup"],
             "choice": row["choice"], "rounds": row["rounds"], "search": row.get("search"),
             "removal_kl": row.get("removal_kl"),
             "uniform": {"kv_groups": uni["kv_groups"], "ffn": uni["ffn"], "params": uni["params"],
                         "measured": uni["measured_speedup"], "perplexity": ppl(uni["model"])}}
        results.append((r, row["model"], uni["model"]))
    return finish(args, argv, prior, cfg, graph, corpus, ppl, dense, results, table_info, timings, which, samples,
                  seq_len, windows, work, t_all, tokens=tokens, table=table)


def finish(args, argv, prior, cfg, graph, corpus, ppl, dense, results, table_info, timings, which, samples, seq_len,
           windows, work, t_all, tokens=None, table=None) -> int:
    """Distillation, gradual mode and the report; `results` holds (row, ZipLM model, uniform model) per target."""
    from llmcompress.hardware.cost_model import CostModel
    from llmcompress.prune.ziplm_family import measured_speedup

    out = work if args.smoke else RESULTS
    js_path = out / f"{args.reuse}.json"
    command = "python benchmarks/ziplm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if prior is None:
        commands, one_shot_commit = [command], git_commit()
        one_shot_settings = vars(args) | {"cost_table_device": table_info["device"],
                                          "table_clock": table_info["clock"],
                                          "table_prompt_len": table_info["prompt_len"]}
    else:
        commands = prior.get("commands") or [_reproduce_line(js_path.with_suffix(".md"))]
        commands = commands + [command]
        one_shot_commit = prior.get("one_shot_commit", prior["commit"])
        one_shot_settings = prior.get("one_shot_settings", prior["settings"])
    other = "prefill" if cfg.metric == "decode" else "decode"
    distill = [dict(e) for e in prior.get("distill", [])] if prior is not None else []
    gradual = list(prior.get("gradual", [])) if prior is not None else []
    for e in distill:  # rows written before distilled rows named their commit came from the one-shot run
        for key in ("ziplm", "uniform"):
            if e.get(key) is not None:
                e[key].setdefault("commit", prior["commit"])

    def report_out() -> None:
        wall = time.perf_counter() - t_all
        report = {"benchmark": "ziplm", "commit": git_commit(), "machine": machine(), "wall_s": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "settings": vars(args) | {"cost_table_device": table_info["device"],
                                            "table_clock": table_info["clock"],
                                            "table_prompt_len": table_info["prompt_len"],
                                            "calibration": f"{samples} x {seq_len} tokens (first 800 rows)",
                                            "perplexity": f"{windows} windows of 512 tokens from the last 200 rows"},
                  "one_shot_commit": one_shot_commit, "one_shot_settings": one_shot_settings, "commands": commands,
                  "timings": timings, "dense": dense,
                  "results": [r for r, _, _ in results], "distill": distill, "gradual": gradual}
        lines = [f"# ZipLM: structured OBS to {cfg.metric} speed-up targets vs uniform width pruning "
                 f"(errors normalised: {args.normalise}"
                 + (", scaled to removal KL" if args.error_scale == "removal_kl" else "") + ")\n",
                 f"commit {one_shot_commit} (one-shot phase), {report['machine']['cpu']}, {args.threads} torch "
                 f"thread(s), {args.clock} clock; "
                 + (f"whole run {wall / 60:.1f} min" if prior is None else
                    f"this run (at {report['commit']}, reusing the one-shot phase) {wall / 60:.1f} min")
                 + f", peak RSS {report['peak_rss_mb']:.0f} MB\n",
                 f"Dense: {dense['params']:,} params, held-out perplexity {dense['perplexity']:.2f}, "
                 f"{cfg.metric} {dense['latency_ms']:.1f} ms.\n",
                 f"| target | ZipLM predicted | ZipLM measured | measured {other} | ZipLM params | ZipLM ppl (x dense) | "
                 f"uniform (KV groups, FFN) | uniform measured | uniform params | uniform ppl (x dense) |",
                 "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|"]
        d = dense["perplexity"]
        for r, _, _ in results:
            u = r["uniform"]
            lines.append(f"| {r['target']:g}x | {r['predicted']:.3f}x | {r['measured']:.3f}x | "
                         f"{r[f'measured_{other}']:.3f}x | {r['params']:,} | {r['perplexity']:.2f} "
                         f"({r['perplexity'] / d:.2f}x) | {u['kv_groups']}, {u['ffn']} | {u['measured']:.3f}x | "
                         f"{u['params']:,} | {u['perplexity']:.2f} ({u['perplexity'] / d:.2f}x) |")
        scaled = [r for r, _, _ in results if r.get("removal_kl")]
        if scaled:
            kl = scaled[0]["removal_kl"]
            lines += ["", "Errors scaled to each part's removal KL (KL(dense || dense without the part), the sensitivity "
                          "search's calibration windows): attention " + ", ".join(f"{k:.3f}" for k in kl[0::2])
                      + "; FFN " + ", ".join(f"{k:.3f}" for k in kl[1::2]) + " (layers 0..).",
                      "", "| target | attention blocks removed | FFN blocks removed | KV groups kept (sum) | "
                          "FFN channels kept (sum) |", "|---|--:|--:|--:|--:|"]
            for r in scaled:
                ch = r["choice"]
                lines.append(f"| {r['target']:g}x | {sum(a == 0 for a, _ in ch)} | {sum(f == 0 for _, f in ch)} | "
                             f"{sum(a for a, _ in ch)} | {sum(f for _, f in ch):,} |")
        searched = [r for r, _, _ in results if r["search"]]
        if searched:
            lines += ["", f"Sensitivity search ({args.search_steps} steps per target; "
                          f"{searched[0]['search']['protocol']}):", "",
                      "| target | KL plain DP | KL after search | distinct models scored | improvements kept |",
                      "|---|--:|--:|--:|--:|"]
            for r in searched:
                sr = r["search"]
                lines.append(f"| {r['target']:g}x | {sr['start_loss']:.4f} | {sr['loss']:.4f} | {sr['evaluations']} | "
                             f"{sr['accepted']} |")
        if distill:
            lines += ["", f"After global distillation ({args.distill_tokens:,} tokens each, batch 4 x {seq_len}, "
                          "per-layer hidden cosine + logit KL"
                          + (f" + {args.distill_lm:g} x LM loss" if args.distill_lm else "") + "):", "",
                      "| target | ZipLM ppl (x dense) | uniform ppl (x dense) | minutes each | commit |",
                      "|---|--:|--:|--:|---|"]

            def cell(e, key):
                return "not run" if e[key] is None else f"{e[key]['perplexity']:.2f} ({e[key]['perplexity'] / d:.2f}x)"

            def minutes(e, key):
                return "-" if e[key] is None else f"{e[key]['seconds'] / 60:.1f}"

            for e in distill:
                commits = " / ".join(e[k]["commit"] if e[k] is not None else "-" for k in ("ziplm", "uniform"))
                lines.append(f"| {e['target']:g}x | {cell(e, 'ziplm')} | {cell(e, 'uniform')} | "
                             f"{minutes(e, 'ziplm')} / {minutes(e, 'uniform')} | {commits} |")
        if gradual:
            lines += ["", f"Gradual mode ({args.gradual_tokens:,} distillation tokens after each target, normalised "
                          "hidden MSE + logit KL from the dense model; each target pruned from the previous one):", "",
                      "| target | predicted | measured | params | ppl (x dense) | distillation tokens so far |",
                      "|---|--:|--:|--:|--:|--:|"]
            for e in gradual:
                lines.append(f"| {e['target']:g}x | {e['predicted']:.3f}x | {e['measured']:.3f}x | {e['params']:,} | "
                             f"{e['perplexity']:.2f} ({e['perplexity'] / d:.2f}x) | {e['cumulative_tokens']:,} |")
        lines += ["", f"- calibration: {report['settings']['calibration']}; perplexity: {report['settings']['perplexity']}",
                  f"- speed-ups: dense / pruned latency, measured end to end (`measure_model`, batch 1, prompt "
                  f"{table_info['prompt_len']}) with the cost table's clock, dense and pruned timed back to back "
                  f"in {cfg.measure_rounds} rounds (median ratio); predicted from the table "
                  f"({table_info['device']}); refinement rounds: {args.refine}",
                  f"- timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}",
                  "- reproduce: " + ", then ".join(f"`{c}`" for c in commands)]
        md = "\n".join(lines) + "\n"
        name = args.name + ("-smoke" if args.smoke else "")
        js, mdp = write_results(name, report, md, out=out)
        print(md)
        print(f"written {js} and {mdp}")


    report_out()  # the one-shot table now; rewritten after each distilled model
    if args.distill_tokens:
        torch.set_num_threads(args.train_threads or args.threads)
        from llmcompress.puzzle.gkd import GKDConfig, train_gkd

        gcfg = GKDConfig(tokens=args.distill_tokens, batch_size=4, lr=1e-4, cosine_weight=1.0, kl_weight=1.0,
                         lm_weight=args.distill_lm)
        train = corpus.train_batches(8 if args.smoke else max(256, -(-args.distill_tokens // seq_len)), seq_len)
        for target in [float(s) for s in args.distill_targets.split(",")]:
            match = [x for x in results if abs(x[0]["target"] - target) < 1e-9]
            if not match:
                continue
            r, zmodel, umodel = match[0]
            old = [e for e in distill if abs(e["target"] - target) < 1e-9]
            entry = old[0] if old else {"target": target, "ziplm": None, "uniform": None}
            if not old:
                distill.append(entry)
            for name, model in (("ziplm", zmodel), ("uniform", umodel)):
                if name not in which or (entry[name] is not None and not args.redistill):
                    continue  # not asked for, or kept from the reused run
                t0 = time.perf_counter()
                rep = train_gkd(graph, model, train, gcfg, folder=work / f"gkd-{name}-{target:g}")
                entry[name] = {"perplexity": ppl(model), "seconds": time.perf_counter() - t0,
                               "tokens": rep["tokens"], "steps": rep["step"], "resumed_from": rep["resumed_from"],
                               "commit": git_commit(),
                               "settings": {"tokens": args.distill_tokens, "lm": args.distill_lm,
                                            "threads": args.train_threads or args.threads}}
                report_out()
        torch.set_num_threads(args.threads)

    if args.gradual_tokens:
        from llmcompress.prune.ziplm_family import prune_gradual

        torch.set_num_threads(args.train_threads or args.threads)
        gcfg = cfg.model_copy(update={"gradual": True, "gradual_tokens": args.gradual_tokens, "refine": 0})
        train = corpus.train_batches(8 if args.smoke else max(256, -(-args.gradual_tokens // seq_len)), seq_len)
        t0 = time.perf_counter()
        rows_g = prune_gradual(graph, tokens, CostModel(table), gcfg, train, folder=work / "gradual", measure=False)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        for k, row in enumerate(rows_g):
            gradual.append({"target": row["target_speedup"], "predicted": row["predicted_speedup"],
                            "measured": measured_speedup(graph, row["model"], cfg.metric, cfg.batch, table,
                                                         cfg.measure_rounds)["speedup"],
                            "params": row["params"], "perplexity": ppl(row["model"]), "choice": row["choice"],
                            "cumulative_tokens": args.gradual_tokens * (k + 1),
                            "distillation": row["distillation"], "seconds_all_targets": seconds})

    report_out()
    return 0


ONE_SHOT_KEYS = ("threads", "clock", "speedups", "metric", "num_samples", "ppl_windows", "refine", "normalise",
                 "search_steps", "search_threads", "error_scale", "measure_rounds")
# settings that results written before them did not record
ONE_SHOT_DEFAULTS = {"error_scale": "none", "measure_rounds": 3}


def _reproduce_line(md: Path) -> str:
    """The command of a results file written before results recorded their commands."""
    for line in md.read_text().splitlines() if md.exists() else []:
        if line.startswith("- reproduce: `"):
            return line.split("`")[1]
    return "(not recorded)"


if __name__ == "__main__":
    raise SystemExit(main())
