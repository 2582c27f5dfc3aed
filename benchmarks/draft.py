"""Draft benchmark: DistillSpec drafts of the default model, measured by greedy speculative decoding on this CPU.

Held-out prompts: chat instructions "Summarise: <document>" built from the last 200 rows of
../shared/data/calib_wikihow.jsonl (each cut to exactly --prompt-tokens tokens), greedy, --new-tokens new tokens,
batch 1. Training prompts: the same instruction over the first 800 rows; fixed data (and the prompts of mixture's
on-policy batches): windows of those rows' own text, --train-prompts of them. The undistilled initial draft (--init)
is compared with drafts distilled under each --config (divergence/data/online-or-offline) from the same start and
with the same step budget. Per draft and gamma: alpha, tau, cost ratio c, predicted and measured wall-clock
speed-up over target-only greedy decoding, and whether the output is identical to the target's.
Writes benchmarks/results/draft.{json,md}.

    python benchmarks/draft.py [--steps 150] [--config fkl/target/offline --config tvd/on-policy/online ...]

Training on a lent GPU, measuring here (the speed-ups are this CPU's): `--train-device cuda --export DIR` trains
the one --config there (--train-seconds: wall-clock budget) and writes the draft's trained tensors (its layers
and final norm in float16, shards under 16 MB; the embeddings/LM head stay the target's), the ids its training
continuations used and the training report to DIR, without measuring anything; `--trained DIR` then measures
that draft here in place of training it (benchmarks/draft_gpu.sh runs the GPU half).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402

import torch  # noqa: E402

DEFAULT_CONFIGS = ["fkl/target/offline", "tvd/target/offline", "fkl/on-policy/online"]


def train_one(args, spec: str, target, start, train: torch.Tensor, prompts: list, work: Path):
    """Distil a copy of `start` under `spec` (DIVERGENCE/DATA/online|offline). -> (draft, training, id counts)"""
    from llmcompress.speculative.train import DistillConfig, train_draft

    div, data, mode = spec.split("/")
    if data in ("fixed", "mixture"):  # the corpus text is the fixed data; its first tokens prompt on-policy batches
        train = fixed_windows(args, target.tokenizer, len(train))
    device = next(target.parameters()).device
    steps = None if args.train_seconds and not args.steps else args.steps
    every = args.eval_every or max((steps or 400) // 4, 1)
    gen_t = args.gen_temperature if args.gen_temperature is not None else 0.0 if data == "target" else 1.0
    cfg = DistillConfig(divergence=div, data=data, online=mode == "online", gen_temperature=gen_t,
                        prompt_tokens=args.prompt_tokens, new_tokens=args.train_new_tokens,
                        batch_size=args.batch_size, gen_batch_size=args.gen_batch_size, lr=args.lr, steps=steps,
                        seconds=args.train_seconds,
                        eval_every=every, eval_prompts=4, eval_new_tokens=48, eval_gamma=3,
                        checkpoint_every=every, freeze_embeddings=True)
    draft = copy.deepcopy(start).to(device)
    t0 = time.perf_counter()
    rep = train_draft(target, draft, train, prompts[:4], cfg, work / spec.replace("/", "_").replace(":", "-"),
                      targets_cache=work / "offline-targets")  # one set of target data for every divergence
    seconds = time.perf_counter() - t0
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    training = {"config": cfg.model_dump(), "steps": rep["steps"], "tokens": rep["tokens"], "seconds": seconds,
                "device": dev_name, "train_prompts": len(train), "acceptance_during_training": rep["acceptance"],
                "loss_first": rep["loss_first"], "loss_last": rep["loss_last"]}
    return draft, training, rep["continuation_counts"]


SHARD_BYTES = 15 * 2**20  # files coming back from a lent machine must stay under 16 MB each


def trained_tensors(draft) -> dict[str, torch.Tensor]:
    """What training changed: every tensor but the (frozen, target-shared) embedding and LM head."""
    return {k: v for k, v in draft.state_dict().items() if "embed_tokens" not in k and not k.startswith("lm_head")}


def export_draft(out: Path, draft, counts: torch.Tensor, info: dict) -> None:
    """Trained tensors as float16 safetensors shards (< 16 MB each), id counts and the report into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in trained_tensors(draft).items()}
    shards, size = [{}], 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"draft-{i:02d}.safetensors"))
    save_file({"counts": counts.cpu()}, str(out / "counts.safetensors"))
    (out / "export.json").write_text(json.dumps(info | {"shards": len(shards), "tensors": len(tensors)}, indent=1,
                                                default=str))


def import_draft(folder: Path, start, spec: str):
    """The draft `export_draft` wrote: a copy of `start` with the trained tensors. -> (draft, training, counts)"""
    from safetensors.torch import load_file

    info = json.loads((folder / "export.json").read_text())
    if info["spec"] != spec:
        raise ValueError(f"{folder} holds a {info['spec']} draft, not {spec}; pass --config {info['spec']}")
    draft = copy.deepcopy(start)
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("draft-*.safetensors")):
        loaded |= load_file(str(shard))
    want = trained_tensors(draft)
    if set(loaded) != set(want) or any(loaded[k].shape != want[k].shape for k in want):
        raise ValueError(f"{folder}: the exported tensors do not fit a {len(draft.model.layers)}-layer draft of "
                         "this target (another --init or target?)")
    with torch.no_grad():
        for k, v in want.items():
            v.copy_(loaded[k].to(v.dtype))
    training = info["training"] | {"exported_as": "float16"}
    return draft.eval(), training, load_file(str(folder / "counts.safetensors"))["counts"]


def training_line(args, results: list[dict]) -> str:
    trained = [r["training"] for r in results if r["training"]]
    if not trained:
        return "- training: none"
    t = trained[0]
    c = t["config"]
    budget = f"{t['steps']} steps of batch {c['batch_size']}"
    if c.get("seconds"):
        budget += f" in a {c['seconds'] / 60:.0f}-minute wall-clock budget"
    where = t.get("device", "cpu")
    p, n = c["prompt_tokens"], c["new_tokens"]
    data = {"target": ("target data = the target's greedy continuations" if not c.get("gen_temperature") else
                       f"target data = continuations sampled from the target at temperature {c['gen_temperature']:g}"
                       f", fresh pools of {c.get('gen_batch_size') or c['batch_size']}, each sequence used once"),
            "on-policy": "on-policy data = continuations sampled from the draft as it trains (temperature 1)",
            "fixed": f"fixed data = windows of {p + n} tokens of the first 800 rows' text (the last {n} trained on)",
            "mixture": f"mixture = on-policy with probability {c['mixture']:g} per batch, fixed otherwise (the "
                       f"on-policy prompts: the windows' first {p} tokens)"}
    used = [data[k] for k in data if any(x["config"]["data"] == k for x in trained)]
    return (f"- training: lr {c['lr']}, {budget}, {t.get('train_prompts', '?')} training prompts of "
            f"{p} tokens + {n} continuation tokens, embeddings/LM head frozen; " + "; ".join(used)
            + " (offline: top-64 log-probs cached once; online: "
            f"target inside each step); trained on {where}"
            + (", TF32 matmuls, the trained tensors brought here in float16" if where != "cpu" else ""))


def data_rows() -> list[str]:
    """The texts of calib_wikihow.jsonl ($LLMCOMPRESS_DATA or ../shared/data)."""
    data_file = Path(os.environ.get("LLMCOMPRESS_DATA", ROOT.parent / "shared" / "data")) / "calib_wikihow.jsonl"
    return [json.loads(line)["text"] for line in open(data_file)]


def fixed_windows(args, tok, n: int | None) -> torch.Tensor:
    """Non-overlapping windows of --prompt-tokens + --train-new-tokens tokens of the first 800 rows' text (shuffled
    with seed 0), n of them (None: all): the fixed data source. -> [N, S]"""
    from llmcompress.data import pack, token_stream

    return pack(token_stream(tok, data_rows()[:800]), args.prompt_tokens + args.train_new_tokens, n, seed=0)


def prompt_sets(args, tok):
    """Training prompts [N, P] (first 800 rows), held-out prompts (last 200 rows, each [1, P]) and the evaluation
    settings, from --train-prompts, --prompts-per-doc, --eval-prompts, --prompt-tokens, --new-tokens, --gammas (and
    --draft-stop, --cpu-linear where the script has them)."""
    from llmcompress.speculative.evaluate import SpecEvalConfig, instruction_prompts

    rows = data_rows()
    train = instruction_prompts(tok, rows[:800], args.train_prompts, args.prompt_tokens,
                                per_doc=args.prompts_per_doc)  # [N, P]
    held = instruction_prompts(tok, rows[-200:], args.eval_prompts, args.prompt_tokens)
    prompts = [p[None] for p in held]
    ecfg = SpecEvalConfig(gammas=[int(g) for g in args.gammas.split(",")], prompts=len(prompts),
                          new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                          draft_stop=getattr(args, "draft_stop", 0.0), cpu_linear=getattr(args, "cpu_linear", "auto"))
    return train, prompts, ecfg


def measurer(args, target, prompts: list, ecfg):
    """draft -> `evaluate_speculative` report, timed with --threads (training goes on with --train-threads)."""
    from llmcompress.speculative.evaluate import evaluate_speculative

    def measure(draft) -> dict:
        torch.set_num_threads(args.threads)
        try:
            return evaluate_speculative(target, draft, prompts, ecfg)
        finally:
            torch.set_num_threads(args.train_threads)

    return measure


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def results_table(results: list[dict], base: dict, suffix: str = "") -> list[str]:
    """Markdown rows (header included): one per draft and gamma, tau against the undistilled draft `base`'s (a
    row's own "base", where it has one); `suffix` follows each draft's name."""
    lines = ["| draft | training | gamma | alpha | kept by position | tau | tau / undistilled | c | "
             "predicted speed-up | measured speed-up | identical |", "|---|---|--:|--:|---|--:|--:|--:|--:|--:|---|"]
    for r in results:
        t = r["training"]
        train_s = "-" if t is None else (f"{t['steps']} steps, {t['tokens']:,} tok, {t['seconds'] / 60:.1f} min"
                                         + (f" on {t['device']}" if t.get("device", "cpu") != "cpu" else ""))
        for row, brow in zip(r["eval"]["gammas"], r.get("base", base)["gammas"]):
            kept = " / ".join(f"{a:.2f}" for a in row.get("acceptance_by_position", [])) or "-"
            alone = r["eval"].get("draft_kind") == "none"  # prompt lookup alone: no draft model, no alpha or c
            alpha, c = ("-", "-") if alone else (f"{row['alpha']:.3f}", f"{r['eval']['cost_ratio_c']:.3f}")
            name = r["draft"] + ("" if alone else suffix)
            lines.append(f"| {name} | {train_s} | {row['gamma']} | {alpha} | {kept} | "
                         f"{row['tau']:.2f} | {row['tau'] / brow['tau']:.2f} | {c} | "
                         f"{_x(row['predicted_speedup'])} | {row['measured_speedup']:.2f}x | "
                         f"{row['identical_output']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--init", default="layers:6")
    ap.add_argument("--config", action="append", default=None,
                    help="DIVERGENCE/DATA/online|offline, e.g. jsd:0.5/mixture/online (repeatable)")
    ap.add_argument("--steps", type=int, default=150,
                    help="training steps per distilled draft (0 with --train-seconds: the clock alone)")
    ap.add_argument("--gen-temperature", type=float, default=None,
                    help="sampling temperature of generated continuations (default: 0 = greedy for target data, "
                         "1 for on-policy); sampled target data with --gen-batch-size: fresh pools, each used once")
    ap.add_argument("--gen-batch-size", type=int, default=None,
                    help="prompts per generate call when making the target's continuations (GPU: 512; sampled ones: "
                         "the size of each fresh pool)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--train-new-tokens", type=int, default=64)
    ap.add_argument("--prompts-per-doc", type=int, default=1,
                    help="training prompts framed from each training document's consecutive pieces")
    ap.add_argument("--train-seconds", type=float, default=None, help="wall-clock training budget per draft")
    ap.add_argument("--train-device", default="cpu", help="where drafts are trained (cuda: with --export)")
    ap.add_argument("--export", default=None, help="train the one --config, write its trained tensors here, "
                                                   "measure nothing")
    ap.add_argument("--trained", default=None, help="measure the draft that --export wrote to this folder "
                                                    "instead of training the one --config")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between acceptance logs (default steps/4)")
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
    from llmcompress.speculative.vocab import frequent_tokens, restrict_vocab, special_ids

    configs = args.config or DEFAULT_CONFIGS
    if (args.export or args.trained) and len(configs) != 1:
        ap.error("--export and --trained take exactly one --config")
    if args.export and args.trained:
        ap.error("--export trains a draft, --trained measures one: give one of them")
    if args.trained and not (Path(args.trained) / "export.json").is_file():
        ap.error(f"--trained {args.trained}: no export.json there; give the folder that --export wrote")
    if args.train_device != "cpu" and not args.export:
        ap.error(f"--train-device {args.train_device} needs --export: speed is measured on this CPU")
    if args.smoke:
        args.steps, args.train_prompts, args.eval_prompts, args.new_tokens = 4, 16, 2, 16
        configs = configs[:2]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    target = load(args.target, device=args.train_device if args.export else "cpu")
    if args.train_device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; the measured drafts run in fp32 on the CPU
    tok = target.tokenizer
    train, prompts, ecfg = prompt_sets(args, tok)

    measure = measurer(args, target, prompts, ecfg)

    torch.set_num_threads(args.train_threads)
    start = init_draft(target, args.init)
    if args.export:
        spec = configs[0]
        draft, training, counts = train_one(args, spec, target, start, train, prompts, work)
        export_draft(Path(args.export), draft, counts, {"spec": spec, "training": training, "settings": vars(args),
                                                        "commit": git_commit(), "machine": machine()})
        print(f"trained {spec}: {training['steps']} steps, {training['tokens']:,} tokens, "
              f"{training['seconds']:.0f} s on {training['device']}; written to {args.export}")
        return 0
    results = [{"draft": f"{args.init} undistilled", "training": None, "eval": measure(start)}]
    for spec in configs:
        if args.trained:
            try:
                draft, training, counts = import_draft(Path(args.trained), start, spec)
            except ValueError as e:
                ap.error(str(e))
        else:
            draft, training, counts = train_one(args, spec, target, start, train, prompts, work)
        results.append({"draft": f"{args.init} {spec}", "training": training, "eval": measure(draft)})
        for k in [int(v) for v in args.draft_vocab.split(",") if v.strip()]:
            keep = frequent_tokens(counts, k, special_ids(tok))
            small = restrict_vocab(copy.deepcopy(draft), keep)
            results.append({"draft": f"{args.init} {spec} vocab {k}", "training": training, "eval": measure(small)})

    wall = time.perf_counter() - t_all
    base = results[0]["eval"]
    report = {"benchmark": "draft", "commit": git_commit(), "machine": machine(), "wall_s": wall,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "settings": vars(args),
              "target": args.target, "results": results}
    trained_from = f"imported from {args.trained}" if args.trained else f"with {args.train_threads} threads"
    lines = [f"# Speculative decoding drafts of {args.target} (DistillSpec), greedy, this CPU\n",
             f"commit {report['commit']}, {report['machine']['cpu']}; speed measured with {args.threads} torch "
             f"threads, training {trained_from}; whole run {wall / 60:.1f} min\n",
             f"{len(prompts)} held-out prompts (\"Summarise: <document>\" chat prompts of {args.prompt_tokens} tokens "
             f"from the last 200 rows), {args.new_tokens} new tokens each, batch 1. Target alone: "
             f"{base['target_tok_s']:.1f} tok/s.\n"] + results_table(results, base)
    lines += ["", "Acceptance during training (alpha at gamma 3 on 4 held-out prompts, 48 tokens):", ""]
    for r in results[1:]:
        if " vocab " in r["draft"]:
            continue
        hist = ", ".join(f"{e['step']}: {e['alpha']:.2f}" for e in r["training"]["acceptance_during_training"])
        lines.append(f"- {r['draft']}: {hist}")
    lines += ["", f"- protocol: {base['protocol']}",
              training_line(args, results),
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
