"""Draft benchmark: DistillSpec drafts of the default model, measured by greedy speculative decoding on this CPU.

Held-out prompts: chat instructions "Summarise: <document>" built from the last 200 rows of
../shared/data/calib_wikihow.jsonl (each cut to exactly --prompt-tokens tokens), greedy, --new-tokens new tokens,
batch 1. Training prompts: the same instruction over the first 800 rows. The undistilled initial draft (--init)
is compared with drafts distilled under each --config (divergence/data/online-or-offline) from the same start and
with the same step budget. Per draft and gamma: alpha, tau, cost ratio c, predicted and measured wall-clock
speed-up over target-only greedy decoding, and whether the output is identical to the target's.
Writes benchmarks/results/draft.{json,md}.

    python benchmarks/draft.py [--steps 150] [--config fkl/target/offline --config tvd/on-policy/online ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402

import torch  # noqa: E402

DEFAULT_CONFIGS = ["fkl/target/offline", "tvd/target/offline", "fkl/on-policy/online"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--init", default="layers:6")
    ap.add_argument("--config", action="append", default=None,
                    help="DIVERGENCE/DATA/online|offline, e.g. jsd:0.5/mixture/online (repeatable)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per distilled draft")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--train-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--gammas", default="1,2,3,4")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads while training")
    ap.add_argument("--threads", type=int, default=2, help="torch threads while measuring speed")
    ap.add_argument("--draft-vocab", default="",
                    help="also measure each distilled draft with its LM head restricted to the N most frequent ids of "
                         "its training continuations, e.g. 4096,8192 (FR-Spec style; still lossless)")
    ap.add_argument("--target", default="default", help="target model (a compressed one for the second row)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-draft"))
    ap.add_argument("--name", default="draft")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    from llmcompress.models import load
    from llmcompress.speculative.draft_init import init_draft
    from llmcompress.speculative.evaluate import SpecEvalConfig, evaluate_speculative, instruction_prompts
    from llmcompress.speculative.train import DistillConfig, train_draft
    from llmcompress.speculative.vocab import frequent_tokens, restrict_vocab, special_ids

    configs = args.config or DEFAULT_CONFIGS
    if args.smoke:
        args.steps, args.train_prompts, args.eval_prompts, args.new_tokens = 4, 16, 2, 16
        configs = configs[:2]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    target = load(args.target)
    tok = target.tokenizer
    rows = [json.loads(line)["text"] for line in open(ROOT.parent / "shared" / "data" / "calib_wikihow.jsonl")]
    train = instruction_prompts(tok, rows[:800], args.train_prompts, args.prompt_tokens)  # [N, P]
    held = instruction_prompts(tok, rows[-200:], args.eval_prompts, args.prompt_tokens)
    prompts = [p[None] for p in held]
    gammas = [int(g) for g in args.gammas.split(",")]
    ecfg = SpecEvalConfig(gammas=gammas, prompts=len(prompts), new_tokens=args.new_tokens,
                          prompt_tokens=args.prompt_tokens)

    def measure(draft) -> dict:
        torch.set_num_threads(args.threads)
        try:
            return evaluate_speculative(target, draft, prompts, ecfg)
        finally:
            torch.set_num_threads(args.train_threads)

    torch.set_num_threads(args.train_threads)
    start = init_draft(target, args.init)
    results = [{"draft": f"{args.init} undistilled", "training": None, "eval": measure(start)}]
    for spec in configs:
        div, data, mode = spec.split("/")
        cfg = DistillConfig(divergence=div, data=data, online=mode == "online", gen_temperature=0 if data == "target"
                            else 1.0, prompt_tokens=args.prompt_tokens, new_tokens=args.train_new_tokens,
                            batch_size=args.batch_size, lr=args.lr, steps=args.steps,
                            eval_every=max(args.steps // 4, 1), eval_prompts=4, eval_new_tokens=48, eval_gamma=3,
                            checkpoint_every=max(args.steps // 4, 1), freeze_embeddings=True)
        draft = copy.deepcopy(start)
        t0 = time.perf_counter()
        rep = train_draft(target, draft, train, prompts[:4], cfg, work / spec.replace("/", "_").replace(":", "-"))
        seconds = time.perf_counter() - t0
        training = {"config": cfg.model_dump(), "steps": rep["steps"], "tokens": rep["tokens"], "seconds": seconds,
                    "acceptance_during_training": rep["acceptance"], "loss_first": rep["loss_first"],
                    "loss_last": rep["loss_last"]}
        results.append({"draft": f"{args.init} {spec}", "training": training, "eval": measure(draft)})
        for k in [int(v) for v in args.draft_vocab.split(",") if v.strip()]:
            keep = frequent_tokens(rep["continuation_counts"], k, special_ids(tok))
            small = restrict_vocab(copy.deepcopy(draft), keep)
            results.append({"draft": f"{args.init} {spec} vocab {k}", "training": training, "eval": measure(small)})

    wall = time.perf_counter() - t_all
    base = results[0]["eval"]
    report = {"benchmark": "draft", "commit": git_commit(), "machine": machine(), "wall_s": wall,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "settings": vars(args),
              "target": args.target, "results": results}
    lines = [f"# Speculative decoding drafts of {args.target} (DistillSpec), greedy, this CPU\n",
             f"commit {report['commit']}, {report['machine']['cpu']}; speed measured with {args.threads} torch "
             f"threads, training with {args.train_threads}; whole run {wall / 60:.1f} min\n",
             f"{len(prompts)} held-out prompts (\"Summarise: <document>\" chat prompts of {args.prompt_tokens} tokens "
             f"from the last 200 rows), {args.new_tokens} new tokens each, batch 1. Target alone: "
             f"{base['target_tok_s']:.1f} tok/s.\n",
             "| draft | training | gamma | alpha | tau | tau / undistilled | c | predicted speed-up | "
             "measured speed-up | identical |", "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        t = r["training"]
        train_s = "-" if t is None else f"{t['steps']} steps, {t['tokens']:,} tok, {t['seconds'] / 60:.1f} min"
        for row, brow in zip(r["eval"]["gammas"], base["gammas"]):
            lines.append(f"| {r['draft']} | {train_s} | {row['gamma']} | {row['alpha']:.3f} | {row['tau']:.2f} | "
                         f"{row['tau'] / brow['tau']:.2f} | {r['eval']['cost_ratio_c']:.3f} | "
                         f"{row['predicted_speedup']:.2f}x | {row['measured_speedup']:.2f}x | "
                         f"{row['identical_output']} |")
    lines += ["", "Acceptance during training (alpha at gamma 3 on 4 held-out prompts, 48 tokens):", ""]
    for r in results[1:]:
        if " vocab " in r["draft"]:
            continue
        hist = ", ".join(f"{e['step']}: {e['alpha']:.2f}" for e in r["training"]["acceptance_during_training"])
        lines.append(f"- {r['draft']}: {hist}")
    lines += ["", f"- protocol: {base['protocol']}",
              f"- training: lr {args.lr}, batch {args.batch_size}, prompts of {args.prompt_tokens} tokens + "
              f"{args.train_new_tokens} continuation tokens, embeddings/LM head frozen; target data = the target's "
              "greedy continuations (offline: top-64 log-probs cached once; online: target inside each step)",
              "- vocab N: the same draft with its LM head restricted to the N ids most frequent in its training "
              "continuations (plus special tokens); q is zero elsewhere, decoding stays lossless",
              "- reproduce: `python benchmarks/draft.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    js, mdp = write_results(args.name + ("-smoke" if args.smoke else ""), report, md, out=work if args.smoke else RESULTS)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
