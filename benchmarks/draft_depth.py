"""How far ahead a feature draft stays right: its conditional acceptance at each draft position, teacher-forced on
the target's own greedy text, held-out and training.

Speculative decoding reports (`kept by position`) come from few verification rounds, and only from the rounds the
draft reached. Here every position n of a continuation (up to --positions of them) starts one round as decoding
does: the draft's cache holds the pairs built from the target's true features up to n, then the draft proposes
--gamma tokens, each after the last from its own predicted feature. Position k counts as kept if it and every
position before it equal the target's greedy tokens; the fraction kept at k among rounds that kept 1..k-1 is the
conditional acceptance. A draft overfits when its held-out figures trail its training ones; it drifts on its own
features when the figure falls from position 1 to 2.

Held-out: the target's greedy continuations (until EOS, at most --new-tokens) of --heldout-prompts "Summarise:"
prompts from the last 200 rows, after the 8 that benchmarks/draft*.py time (so they are not the same prompts).
Training: the first --train-sequences cached training continuations of benchmarks/draft_feature.py, up to where
the target's greedy choice is EOS. Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/draft_depth.py --drafts runs/bench-draft-feature/draft-A runs/bench-draft-feature/draft-B
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_commit, machine, publish  # noqa: E402
from draft import data_rows  # noqa: E402

import torch  # noqa: E402


@torch.no_grad()
def depth_acceptance(target, draft, seqs: list[torch.Tensor], starts: list[int], gamma: int, positions: int
                     ) -> dict:
    """seqs: token ids [L] whose tokens after starts[i] are the target's greedy choices. -> counts and rates"""
    from transformers import DynamicCache

    from llmcompress.speculative.feature_draft import _logits, target_features

    kept, reached, top1 = torch.zeros(gamma), torch.zeros(gamma), [0, 0]
    for seq, start in zip(seqs, starts):
        seq = seq[None]  # [1, L]
        f = target_features(target, seq, None)  # [1, L, D]
        greedy = _logits(target, f)[0].argmax(-1)  # [L]: the target's next token after each position
        _, ql = draft(f[:, :-1], seq[:, 1:])  # position t reads (f_t, x_t+1), proposes x_t+2
        q = ql[0].argmax(-1)  # a subset head still gives full-vocabulary logits
        span = range(start - 1, seq.shape[1] - 2)
        top1[0] += int((q[span.start:span.stop] == greedy[span.start + 1:span.stop + 1]).sum())
        top1[1] += len(span)
        for n in range(start - 1, min(seq.shape[1] - 1, start - 1 + positions)):  # n: the last token's index
            cache = DynamicCache()
            h, ql = draft(f[:, :n], seq[:, 1:n + 1], cache)  # the true pairs, the last proposing x_n+1
            for k in range(gamma):
                if n + k + 1 >= seq.shape[1]:
                    break
                reached[k] += 1
                truth = int(greedy[n + k])
                if int(ql[0, -1].argmax()) != truth:
                    break
                kept[k] += 1
                h, ql = draft(h[:, -1:], seq.new_tensor([[truth]]), cache)
    return {"kept": kept.tolist(), "reached": reached.tolist(),
            "conditional": (kept / reached.clamp(min=1)).tolist(), "teacher_forced_top1": top1[0] / max(top1[1], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drafts", nargs="+", required=True, help="folders of saved feature drafts")
    ap.add_argument("--heldout-prompts", type=int, default=32)
    ap.add_argument("--train-sequences", type=int, default=32)
    ap.add_argument("--positions", type=int, default=40, help="rounds started per sequence (its first positions)")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", default=str(ROOT / "runs" / "bench-draft-feature" / "sequences-96+128-per1"),
                    help="the cached training continuations of benchmarks/draft_feature.py")
    ap.add_argument("--name", default="draft-depth")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    from llmcompress.models import load
    from llmcompress.speculative.evaluate import instruction_prompts
    from llmcompress.speculative.feature_draft import FeatureDraft, _logits, target_features

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    target = load("default")
    tok, eos, P = target.tokenizer, target.tokenizer.eos_token_id, args.prompt_tokens
    held = instruction_prompts(tok, data_rows()[-200:], 8 + args.heldout_prompts, P)[8:]  # [N, P]
    with torch.no_grad():
        out = target.generate(held, attention_mask=torch.ones_like(held), max_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=0)
    held_seqs = []
    for s in out:  # cut after the first EOS (generate pads finished rows)
        e = (s[P:] == eos).nonzero()
        held_seqs.append(s[: P + int(e[0]) + 1] if len(e) else s)
    files = sorted(Path(args.sequences).glob("seq-*.safetensors"))
    if not files:
        ap.error(f"--sequences {args.sequences}: no cached continuations; run benchmarks/draft_feature.py first")
    train = torch.cat([load_file(str(f))["tokens"] for f in files])[: args.train_sequences]
    train_seqs = []
    with torch.no_grad():
        for s in train:  # generated with EOS suppressed: end where the target would have chosen EOS
            greedy = _logits(target, target_features(target, s[None], None))[0].argmax(-1)
            e = (greedy[P - 1:] == eos).nonzero()
            train_seqs.append(s[: P + int(e[0]) + 1] if len(e) else s)
    rows = []
    for folder in args.drafts:
        draft = FeatureDraft.load(target, folder)
        t0 = time.perf_counter()
        rows.append({"draft": folder,
                     "heldout": depth_acceptance(target, draft, held_seqs, [P] * len(held_seqs), args.gamma,
                                                 args.positions),
                     "train": depth_acceptance(target, draft, train_seqs, [P] * len(train_seqs), args.gamma,
                                               args.positions),
                     "seconds": time.perf_counter() - t0})
    wall = time.perf_counter() - t_all
    report = {"benchmark": "draft_depth", "commit": git_commit(), "machine": machine(), "wall_s": wall,
              "settings": vars(args),
              "heldout_new_tokens": sum(len(s) - P for s in held_seqs) / len(held_seqs),
              "train_natural_new_tokens": sum(len(s) - P for s in train_seqs) / len(train_seqs), "results": rows}
    fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = ["# Feature drafts: conditional acceptance by draft position, teacher-forced on the target's greedy "
             "text\n",
             f"commit {report['commit']}, {report['machine']['cpu']}, {args.threads} threads; {wall / 60:.1f} min\n",
             f"Held-out: {len(held_seqs)} \"Summarise:\" prompts of {P} tokens from the last 200 rows (after the 8 "
             f"timed ones), the target's greedy continuations until EOS ({report['heldout_new_tokens']:.1f} tokens on "
             f"average). Training: the first {len(train_seqs)} training continuations, to the target's own EOS "
             f"({report['train_natural_new_tokens']:.1f} tokens). A round starts at each of the first "
             f"{args.positions} continuation positions; gamma {args.gamma}.\n",
             "| draft | held-out top-1 | held-out kept by position | train top-1 | train kept by position | "
             "held-out rounds |", "|---|--:|---|--:|---|--:|"]
    for r in rows:
        h, t = r["heldout"], r["train"]
        lines.append(f"| {Path(r['draft']).name} | {h['teacher_forced_top1']:.3f} | {fmt(h['conditional'])} | "
                     f"{t['teacher_forced_top1']:.3f} | {fmt(t['conditional'])} | {int(h['reached'][0])} |")
    lines += ["", "- top-1: the draft's proposal from true features equals the target's greedy token, over every "
              "continuation position; kept by position k: rounds that kept k among those that kept 1..k-1",
              "- reproduce: `python benchmarks/draft_depth.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    return publish(args.name, report, md)


if __name__ == "__main__":
    raise SystemExit(main())
