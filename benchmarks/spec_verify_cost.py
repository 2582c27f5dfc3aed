"""What speculative verification costs on this CPU: the target scoring k tokens in one cached forward, in units
of one decode step, and the vocabulary-sized LM head alone (F.linear vs W @ x^T, see
`llmcompress.models.modeling_llmcompress.head_linear`).

Leviathan et al.'s speed-up formula assumes that verifying gamma + 1 tokens costs about one decode step; on a
CPU small-M fp32 GEMMs are not free, and this benchmark measures by how much. The k-token forwards are timed in
alternating rounds (one round: every k once, after a fresh 96-token prefill each), median per k.
--cpu-linear onednn runs every linear of the model through oneDNN with its weight reordered once
(`llmcompress.models.cpu_linear`, what speculative evaluation uses by default), torch through F.linear (MKL).
Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/spec_verify_cost.py [--threads 1] [--rounds 9] [--max-k 8] [--cpu-linear torch|onednn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, machine, write_results  # noqa: E402

import torch  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--cpu-linear", default="torch", choices=["torch", "onednn"])
    ap.add_argument("--name", default="spec_verify_cost")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llmcompress.models import load
    from llmcompress.models.cpu_linear import pack_weight, packed_linear, packed_linears, resolve
    from llmcompress.models.modeling_llmcompress import head_linear
    from llmcompress.speculative.decode import feed, prefill

    model = load("default")
    prompt = torch.randint(100, 20000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ks = list(range(1, args.max_k + 1))
    forward: dict[int, list[float]] = {k: [] for k in ks}
    packed = resolve(args.cpu_linear, "cpu")
    with torch.no_grad(), packed_linears(model, enabled=packed):
        for r in range(args.rounds + 1):  # round 0 warms up
            for k in ks:
                cache = prefill(model, prompt)
                feed(model, prompt, cache)  # the prompt's last token: the cache now holds the whole prompt
                extra = torch.randint(100, 20000, (1, k))
                dt = timed(lambda: feed(model, prompt, cache, extra))
                if r:
                    forward[k].append(dt)
        w = model.lm_head.weight  # [V, D]
        pw = pack_weight(w)
        head: dict[int, dict[str, float]] = {}
        for k in ks:
            x = torch.randn(1, k, w.shape[1])
            lin = [timed(lambda: torch.nn.functional.linear(x, w)) for _ in range(args.rounds + 1)][1:]
            ours = [timed(lambda: head_linear(x, w)) for _ in range(args.rounds + 1)][1:]
            dnn = [timed(lambda: packed_linear(x, pw, w.shape[0])) for _ in range(args.rounds + 1)][1:]
            head[k] = {"linear_ms": 1e3 * statistics.median(lin), "head_linear_ms": 1e3 * statistics.median(ours),
                       "onednn_ms": 1e3 * statistics.median(dnn)}
    step = statistics.median(forward[1])
    rows = [{"k": k, "forward_ms": 1e3 * statistics.median(forward[k]),
             "in_decode_steps": statistics.median(forward[k]) / step,
             "spread_ms": [1e3 * min(forward[k]), 1e3 * max(forward[k])]} | head[k] for k in ks]
    report = {"benchmark": "spec_verify_cost", "commit": git_commit(), "machine": machine(), "settings": vars(args),
              "cpu_linear": "onednn" if packed else "torch",
              "vocab": int(w.shape[0]), "hidden": int(w.shape[1]), "rows": rows}
    how = ("every linear through oneDNN, weights reordered once" if packed else
           "F.linear (MKL), the LM head through head_linear")
    lines = [f"# Speculative verification cost on this CPU (default model, {args.threads} thread(s), {how})\n",
             f"commit {report['commit']}, {report['machine']['cpu']}, torch {torch.__version__}; one cached forward of "
             f"k tokens after a {args.prompt_tokens}-token prompt, median of {args.rounds} alternating rounds\n",
             "| k | forward (ms) | in decode steps | min-max (ms) | LM head F.linear (ms) | LM head head_linear (ms) "
             "| LM head oneDNN (ms) |",
             "|--:|--:|--:|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['forward_ms']:.1f} | {r['in_decode_steps']:.2f} | "
                     f"{r['spread_ms'][0]:.1f}-{r['spread_ms'][1]:.1f} | {r['linear_ms']:.1f} | "
                     f"{r['head_linear_ms']:.1f} | {r['onednn_ms']:.1f} |")
    lines += ["", f"- forward: {how}; the LM head columns time the {w.shape[0]}x{w.shape[1]} head alone three ways "
              "(head_linear: W @ x^T for 2..8 rows)",
              "- greedy speculative decoding at gamma verifies k = gamma + 1 tokens per target call",
              "- reproduce: `python benchmarks/spec_verify_cost.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    js, mdp = write_results(args.name, report, md)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
