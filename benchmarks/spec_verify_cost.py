"""What speculative verification costs on this CPU: the target scoring k tokens in one cached forward, in units
of one decode step, with every linear computed by `rows_linear` (W @ x^T for 2..8 rows on CPU, the model's
forward) and by plain F.linear (MKL sgemm), plus the model's weight shapes alone both ways
(`llmcompress.models.modeling_llmcompress.rows_linear`).

Leviathan et al.'s speed-up formula assumes that verifying gamma + 1 tokens costs about one decode step; on a
CPU small-M fp32 GEMMs are not free, and this benchmark measures by how much. The k-token forwards are timed in
alternating rounds (one round: every k once per path, after a fresh 96-token prefill each), median per k.
Writes benchmarks/results/spec_verify_cost.{json,md}.

    python benchmarks/spec_verify_cost.py [--threads 1] [--rounds 9] [--max-k 8]
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class _PlainHead(nn.Linear):
    """The LM head computed by F.linear (a subclass, so the model's forward calls it instead of rows_linear)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def set_path(model, path: str) -> None:
    """Switch every decoder linear and the LM head between `rows_linear` ("rows") and F.linear ("plain")."""
    from llmcompress.models.modeling_llmcompress import Linear

    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not model.lm_head:
            m.__class__ = Linear if path == "rows" else nn.Linear
    model.lm_head.__class__ = nn.Linear if path == "rows" else _PlainHead


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--name", default="spec_verify_cost")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llmcompress.models import load
    from llmcompress.models.modeling_llmcompress import rows_linear
    from llmcompress.speculative.decode import feed, prefill

    model = load("default")
    prompt = torch.randint(100, 20000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ks = list(range(1, args.max_k + 1))
    paths = ("rows", "plain")
    forward = {p: {k: [] for k in ks} for p in paths}
    with torch.no_grad():
        for r in range(args.rounds + 1):  # round 0 warms up
            for k in ks:
                for p in paths:
                    set_path(model, p)
                    cache = prefill(model, prompt)
                    feed(model, prompt, cache)  # the prompt's last token: the cache now holds the whole prompt
                    extra = torch.randint(100, 20000, (1, k))
                    dt = timed(lambda: feed(model, prompt, cache, extra))
                    if r:
                        forward[p][k].append(dt)
        set_path(model, "rows")
        # each distinct weight shape alone; decoder shapes rotate over one copy per layer (as in a forward)
        shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                shapes.setdefault(tuple(m.weight.shape), []).append(m.weight)
        alone = []
        for (n, kdim), ws in sorted(shapes.items()):
            for k in sorted({1, 2, 4, min(8, args.max_k)}):
                x = torch.randn(1, k, kdim)
                t = {"F.linear": [], "rows_linear": []}
                for i in range(args.rounds * len(ws) + len(ws)):
                    w = ws[i % len(ws)]
                    lin, ours = timed(lambda: F.linear(x, w)), timed(lambda: rows_linear(x, w))
                    if i >= len(ws):
                        t["F.linear"].append(lin)
                        t["rows_linear"].append(ours)
                alone.append({"shape": [n, kdim], "copies": len(ws), "k": k,
                              "linear_us": 1e6 * statistics.median(t["F.linear"]),
                              "rows_linear_us": 1e6 * statistics.median(t["rows_linear"])})
    rows = []
    for k in ks:
        row = {"k": k}
        for p in paths:
            med = statistics.median(forward[p][k])
            row |= {f"{p}_ms": 1e3 * med, f"{p}_in_decode_steps": med / statistics.median(forward[p][1]),
                    f"{p}_spread_ms": [1e3 * min(forward[p][k]), 1e3 * max(forward[p][k])]}
        rows.append(row)
    report = {"benchmark": "spec_verify_cost", "commit": git_commit(), "machine": machine(), "settings": vars(args),
              "rows": rows, "alone": alone}
    lines = [f"# Speculative verification cost on this CPU (default model, {args.threads} thread(s))\n",
             f"commit {report['commit']}, {report['machine']['cpu']}, torch {torch.__version__}; one cached forward of "
             f"k tokens after a {args.prompt_tokens}-token prompt, median of {args.rounds} alternating rounds; "
             "rows_linear: every linear as W @ x^T for 2..8 rows (the model's forward), F.linear: MKL sgemm\n",
             "| k | rows_linear (ms) | in decode steps | min-max (ms) | F.linear (ms) | in decode steps | min-max (ms) |",
             "|--:|--:|--:|---|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['rows_ms']:.1f} | {r['rows_in_decode_steps']:.2f} | "
                     f"{r['rows_spread_ms'][0]:.1f}-{r['rows_spread_ms'][1]:.1f} | {r['plain_ms']:.1f} | "
                     f"{r['plain_in_decode_steps']:.2f} | {r['plain_spread_ms'][0]:.1f}-{r['plain_spread_ms'][1]:.1f} |")
    lines += ["", "Each weight shape of the model alone (median over rounds x one copy per layer):", "",
              "| weight [N, K] | copies | k | F.linear (us) | rows_linear (us) |", "|---|--:|--:|--:|--:|"]
    for a in alone:
        lines.append(f"| {a['shape'][0]}x{a['shape'][1]} | {a['copies']} | {a['k']} | {a['linear_us']:.0f} | "
                     f"{a['rows_linear_us']:.0f} |")
    lines += ["", "- greedy speculative decoding at gamma verifies k = gamma + 1 tokens per target call",
              "- reproduce: `python benchmarks/spec_verify_cost.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    js, mdp = write_results(args.name, report, md)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
