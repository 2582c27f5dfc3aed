"""Cost model check: predicted vs measured end-to-end latency of heterogeneous graphs of the default model.

    python benchmarks/cost_model.py [--device cpu] [--threads 1] [--gen-len 64] [--out benchmarks/results]

Profiles the cost table of SmolLM2-135M on the device (batch 1, prompt 512), builds several graphs from the
table's variants (the parent, uniform 50% FFN, attention no-op in every other layer, 1 KV head, a random mix,
interpolated FFN sizes, removed layers, linear replacements), predicts each graph's prefill latency and
decode latency per token with `CostModel`, and measures them on the whole model with `measure_model`
(prefill: one forward over [1, prompt_len]; decode: mean step time of gen_len greedy steps after the prompt).
Writes benchmarks/results/cost_model-<device>.json and .md. Target: every prediction within 15%.
--random-weights builds the same architecture with random weights (for machines without the converted model).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, write_results  # noqa: E402  (shared with the other benchmarks)

ROOT = Path(__file__).resolve().parents[1]
TARGET_PCT = 15.0
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, num_hidden_layers=30, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)


def error_pct(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def graph_specs(n_layers: int, table) -> list[tuple[str, str, dict]]:
    """(name, description, {layer: BlockConfig | None}) for each test graph; None removes the layer."""
    from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig

    s = table.settings
    parent = BlockConfig(attention=AttentionConfig(num_heads=s.num_attention_heads, num_kv_heads=s.num_key_value_heads),
                         ffn=FFNConfig(intermediate_size=s.intermediate_size))
    att = lambda **kw: AttentionConfig(**kw)  # noqa: E731
    half = FFNConfig(intermediate_size=round(s.intermediate_size / 2 / 8) * 8)
    interp = FFNConfig(intermediate_size=round(0.65 * s.intermediate_size / 8) * 8)
    kv1 = att(num_heads=s.num_attention_heads, num_kv_heads=1)
    rng = random.Random(0)
    atts = sorted({(e.variant, e.format) for e in table.entries.values() if e.part == "attention"})
    ffns = sorted({(e.variant, e.format) for e in table.entries.values() if e.part == "ffn"})

    def parse_att(v):
        if v.startswith("gqa_"):
            h, kv = v[4:].split("_")
            return att(num_heads=int(h[:-1]), num_kv_heads=int(kv[:-2]))
        return att(kind=v)

    def parse_ffn(v):
        return FFNConfig(intermediate_size=int(v[4:])) if v.startswith("mlp_") else FFNConfig(kind=v)

    mix = {i: BlockConfig(attention=parse_att(rng.choice(atts)[0]), ffn=parse_ffn(rng.choice(ffns)[0]))
           for i in range(n_layers)}
    return [
        ("parent", "the model as loaded", {}),
        ("ffn-50", f"every FFN at {half.intermediate_size} (50%)", {i: parent.model_copy(update={"ffn": half})
                                                                    for i in range(n_layers)}),
        ("attn-noop-odd", "attention no-op in every odd layer",
         {i: parent.model_copy(update={"attention": att(kind="noop")}) for i in range(1, n_layers, 2)}),
        ("kv-1", "every attention with 1 KV head", {i: parent.model_copy(update={"attention": kv1})
                                                    for i in range(n_layers)}),
        ("random-mix", "each layer a random attention and FFN variant of the table (seed 0)", mix),
        ("ffn-interp", f"every FFN at {interp.intermediate_size} (interpolated), 1 KV head in every third layer",
         {i: BlockConfig(attention=kv1 if i % 3 == 0 else parent.attention, ffn=interp) for i in range(n_layers)}),
        ("removed-third", "every third layer removed", {i: None for i in range(0, n_layers, 3)}),
        ("linear", "attention linear in the middle third, FFN linear in the last sixth",
         {i: parent.model_copy(update={"attention": att(kind="linear")})
          for i in range(n_layers // 3, 2 * n_layers // 3)}
         | {i: parent.model_copy(update={"ffn": FFNConfig(kind="linear")})
            for i in range(5 * n_layers // 6, n_layers)}),
    ]


def make_graph(args, changes: dict):
    from llmcompress.models import LlmcNasConfig, build, load, remove_layers, set_block

    dtype = getattr(torch, args.dtype)
    graph = build(LlmcNasConfig(**SMOLLM2_135M), dtype, args.device) if args.random_weights \
        else load(args.model, dtype=dtype, device=args.device)
    for i, block in changes.items():
        if block is not None:
            set_block(graph, i, block)
    remove_layers(graph, [i for i, b in changes.items() if b is None])
    return graph.eval()


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"# Cost model: predicted vs measured latency on {r['device']}",
        "",
        f"Model {s['model']} ({s['dtype']}), {s['threads']} torch threads, {s['clock']} clock, torch {s['torch']}, "
        f"commit {r['commit']}, {r['wall_s']} s in all. Batch {s['batch']}; prefill = one forward over "
        f"{s['prompt_len']} tokens; decode = mean step of {s['gen_len']} greedy steps after the prompt (table: one "
        f"step at {r['cost_table']['settings']['decode_context']} cached tokens). Table: {s['table_repeats']} repeats per "
        f"entry, decode working set {r['cost_table']['settings']['working_set_mb']:.0f} MiB; measured: median of "
        f"{s['repeats']} [min-max]. Error = (predicted - measured) / measured; "
        f"target |error| <= {r['target_pct']:.0f}%.",
        "",
        "| graph | layers | params (M) | prefill pred (ms) | prefill meas (ms) | err | decode pred (ms/tok) "
        "| decode meas (ms/tok) | err | speed-up pred/meas (decode) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for x in r["results"]:
        p, m, e = x["predicted"], x["measured"], x["error_pct"]
        flag = lambda v: f"**{v:+.1f}%**" if abs(v) > r["target_pct"] else f"{v:+.1f}%"  # noqa: E731
        lines.append(
            f"| {x['name']} | {x['layers']} | {x['params'] / 1e6:.1f} | {p['prefill_ms']:.1f} | "
            f"{m['prefill']['median_ms']:.1f} [{m['prefill']['min_ms']:.0f}-{m['prefill']['max_ms']:.0f}] | "
            f"{flag(e['prefill'])} | {p['decode_ms_per_token']:.2f} | {m['decode']['median_ms']:.2f} "
            f"[{m['decode']['min_ms']:.1f}-{m['decode']['max_ms']:.1f}] | {flag(e['decode'])} | "
            f"{x['speedup_predicted']:.2f} / {x['speedup_measured']:.2f} |")
    lines += ["", "Graphs:", ""] + [f"- {x['name']}: {x['description']}" for x in r["results"]]
    worst = max(abs(v) for x in r["results"] for v in x["error_pct"].values())
    lines += ["", f"Largest |error|: {worst:.1f}% ({'within' if worst <= r['target_pct'] else 'exceeds'} the "
                  f"{r['target_pct']:.0f}% target)."]
    if r.get("notes"):
        lines += ["", r["notes"]]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    from llmcompress.evaluation import device_name
    from llmcompress.hardware import CostModel, measure_model, profile
    from llmcompress.models import count_params

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    parent = make_graph(args, {})
    table = profile(parent, [1], args.prompt_len, args.gen_len, repeats=args.table_repeats, clock=args.clock,
                    model_name="random SmolLM2-135M" if args.random_weights else args.model)
    print(f"profiled {len(table.entries)} entries in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    n_layers = parent.config.num_hidden_layers
    del parent
    cm = CostModel(table)
    results = []
    for name, description, changes in graph_specs(n_layers, table):
        if args.graphs and name not in args.graphs:
            continue
        graph = make_graph(args, changes)
        pred = cm.predict(graph, batch=1)
        meas = measure_model(graph, 1, args.prompt_len, args.gen_len, repeats=args.repeats, clock=args.clock)
        results.append({
            "name": name, "description": description, "layers": len(graph.model.layers),
            "params": count_params(graph), "predicted": pred,
            "measured": {k: v.model_dump() for k, v in meas.items()},
            "error_pct": {"prefill": error_pct(pred["prefill_ms"], meas["prefill"].median_ms),
                          "decode": error_pct(pred["decode_ms_per_token"], meas["decode"].median_ms)},
        })
        print(f"{name}: prefill {pred['prefill_ms']:.1f} vs {meas['prefill'].median_ms:.1f} ms, decode "
              f"{pred['decode_ms_per_token']:.2f} vs {meas['decode'].median_ms:.2f} ms/token", file=sys.stderr)
        del graph
    base = results[0]
    for x in results:
        x["speedup_predicted"] = base["predicted"]["decode_ms_per_token"] / x["predicted"]["decode_ms_per_token"]
        x["speedup_measured"] = base["measured"]["decode"]["median_ms"] / x["measured"]["decode"]["median_ms"]
    return {
        "device": device_name(torch.device(args.device)),
        "commit": git_commit(),
        "target_pct": TARGET_PCT,
        "settings": {"model": table.settings.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                     "clock": args.clock, "batch": 1, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                     "repeats": args.repeats,
                     "table_repeats": args.table_repeats, "torch": torch.__version__,
                     "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
        "cost_table": table.model_dump(mode="json"),
        "notes": args.notes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="process: CPU time of this process (with --threads 1: ignores other programs' load)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="end-to-end measurements per graph")
    p.add_argument("--table-repeats", type=int, default=10)
    p.add_argument("--graphs", nargs="+", default=None, help="only these graphs (the first is the speed-up base)")
    p.add_argument("--notes", default="", help="a paragraph appended to the markdown report")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked, but CUDA is not available here", file=sys.stderr)
        return 2
    report = run(args)
    js, md = write_results(f"cost_model-{'cpu' if args.device == 'cpu' else 'cuda'}", report, markdown(report), args.out)
    print(f"wrote {js} and {md} ({report['wall_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
