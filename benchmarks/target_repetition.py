"""How repetitive a target's greedy answers are: distinct 3-grams per answer on the draft benchmark's held-out prompts.

A draft predicts a target that repeats itself easily, so a high alpha against such a target says little. This
measures the dense default model and any other target (e.g. the layer-pruned one of
recipes/draft-compressed-target.yaml) on the same "Summarise:" prompts, greedy, batch 1.
Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/target_repetition.py --target default --target runs/draft-compressed-target/00-prune/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, machine, publish  # noqa: E402
from draft import prompt_sets  # noqa: E402

import torch  # noqa: E402


def distinct_ngrams(ids: list[int], n: int = 3) -> float:
    """Share of an answer's n-grams that are distinct (1: no n-gram repeats)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", action="append", required=True, help="'default' or a model folder (repeatable)")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="target-repetition")
    args = ap.parse_args(argv)

    from llmcompress.models import load
    from llmcompress.speculative.train import generate

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.target:
        model = load(name, device="cpu")
        a = argparse.Namespace(train_prompts=1, prompts_per_doc=1, eval_prompts=args.eval_prompts,
                               prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, gammas="1")
        _, prompts, _ = prompt_sets(a, model.tokenizer)
        out = generate(model, torch.cat(prompts), args.new_tokens, 0.0, 0)[:, args.prompt_tokens:]  # [N, new]
        eos = model.config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        answers = [o[: next((i for i, t in enumerate(o) if t in eos), len(o))] for o in out.tolist()]  # to the EOS
        rows.append({"target": name, "distinct_3grams": [distinct_ngrams(a) for a in answers],
                     "first_answer": model.tokenizer.decode(answers[0][:60])})
    report = {"benchmark": "target_repetition", "commit": git_commit(), "machine": machine(), "settings": vars(args),
              "results": rows}
    lines = [f"# Repetition of targets' greedy answers ({len(prompts)} held-out \"Summarise:\" prompts, "
             f"{args.new_tokens} new tokens)\n", f"commit {report['commit']}, {report['machine']['cpu']}\n",
             "| target | distinct 3-grams per answer | mean | first answer (60 tokens) |", "|---|---|--:|---|"]
    for r in rows:
        d = r["distinct_3grams"]
        first = r["first_answer"].replace("\n", " ").replace("|", "/")
        lines.append(f"| {r['target']} | {' / '.join(f'{x:.2f}' for x in d)} | {sum(d) / len(d):.2f} | {first} |")
    lines += ["", "- reproduce: `python benchmarks/target_repetition.py " + " ".join(argv or sys.argv[1:]) + "`"]
    return publish(args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
