"""2:4 sparsity and quantization, one-shot and recovered by distillation, side by side with llm-compressor.

Model: the default SmolLM2-135M. Data: ../shared/data/calib_wikihow.jsonl, the first 800 rows for
calibration / training (128 sequences of 512 tokens for one-shot), held-out perplexity on the last 200
rows (our protocol: non-overlapping 512-token windows). Every row compresses in a process of its own,
so its wall time and peak RSS (VmHWM) are its own; the peer (llm-compressor, in its own virtualenv:
bash benchmarks/peer_setup.sh) gets the same dense model (saved as a plain Llama folder) and the same
calibration token ids. All checkpoints are then evaluated here with the same perplexity function.
Writes benchmarks/results/sparsity_quant.json and .md.
  python benchmarks/sparsity_quant.py                 # everything (hours on a 2-core CPU)
  python benchmarks/sparsity_quant.py --smoke         # 4 x 128-token samples, 4 windows, minimal recovery
  python benchmarks/sparsity_quant.py --rows dense,sparsegpt_24,peer_sparsegpt_24
  python benchmarks/sparsity_quant.py --reuse         # rows finished earlier (same settings) are kept
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_commit, machine, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data" / "calib_wikihow.jsonl"

# row -> (label, kind, base row for recovery); kinds: dense, ours (one-shot), peer, recover
ROWS = {
    "dense": ("dense", "dense", None),
    "magnitude_24": ("2:4 magnitude (ours)", "ours", None),
    "wanda_24": ("2:4 Wanda (ours)", "ours", None),
    "sparsegpt_24": ("2:4 SparseGPT (ours)", "ours", None),
    "peer_sparsegpt_24": ("2:4 SparseGPT (peer)", "peer", None),
    "peer_wanda_24": ("2:4 Wanda (peer)", "peer", None),
    "rtn_w4a16_g64": ("W4A16 g64 sym RTN (ours)", "ours", None),
    "gptq_w4a16_g64": ("W4A16 g64 sym GPTQ (ours)", "ours", None),
    "peer_gptq_w4a16_g64": ("W4A16 g64 sym GPTQ (peer)", "peer", None),
    "w8a8": ("W8A8 SmoothQuant + GPTQ (ours)", "ours", None),
    "peer_w8a8": ("W8A8 SmoothQuant + GPTQ (peer)", "peer", None),
    "sparsegpt_24_gptq_w4a16_g64": ("2:4 + W4A16 g64 one-shot (ours)", "ours", None),
    "peer_sparsegpt_24_gptq_w4a16_g64": ("2:4 + W4A16 g64 one-shot (peer)", "peer", None),
    "recover_24": ("2:4 after recovery (ours)", "recover", "sparsegpt_24"),
    "qd_w4a16_g64": ("W4A16 g64 after quantized distillation (ours)", "recover", "gptq_w4a16_g64"),
    "diffq_w4a16_g64": ("W4A16 g64 after differentiable quantization (ours)", "recover", "gptq_w4a16_g64"),
    "recover_24_w4a16_g64": ("2:4 + W4A16 g64 after recovery (ours)", "recover", "sparsegpt_24_gptq_w4a16_g64"),
    "rtn_w4a16_g32_asym": ("curiosity: W4A16 g32 asym RTN (the GGUF's Q4_1 grid)", "ours", None),
}
PEER_METHOD = {"peer_sparsegpt_24": "sparsegpt_24", "peer_wanda_24": "wanda_24", "peer_gptq_w4a16_g64": "gptq_w4a16",
               "peer_w8a8": "w8a8", "peer_sparsegpt_24_gptq_w4a16_g64": "sparsegpt_24_gptq_w4a16"}
PEER_OF = {"sparsegpt_24": "peer_sparsegpt_24", "wanda_24": "peer_wanda_24", "gptq_w4a16_g64": "peer_gptq_w4a16_g64",
           "w8a8": "peer_w8a8", "sparsegpt_24_gptq_w4a16_g64": "peer_sparsegpt_24_gptq_w4a16_g64"}
# targets: perplexity at most this multiple of dense
DENSE_TARGETS = {"w8a8": 1.02, "qd_w4a16_g64": 1.15, "diffq_w4a16_g64": 1.15, "recover_24": 2.0,
                 "recover_24_w4a16_g64": 2.2}
SMOOTHING = 0.8  # SmoothQuant strength of both W8A8 rows (llm-compressor's example value)


# ----------------------------------------------------------------------------- settings
def settings(args) -> dict:
    smoke = args.smoke
    s = {
        "num_samples": 4 if smoke else 128, "seq_len": 128 if smoke else 512,
        "eval_windows": 4 if smoke else args.eval_windows, "threads": args.threads,
        # recovery budget per row (stated in the results); at most 30 minutes each on the 2-core CPU
        # (on this CPU a local step of one layer at 4 x 512 tokens takes ~0.35 s, a global step ~30 s)
        "recover": {"num_samples": 4 if smoke else args.recover_samples, "seq_len": 128 if smoke else 512,
                    "batch_size": 2 if smoke else 4,
                    "local_steps": 1 if smoke else args.local_steps, "global_steps": 2 if smoke else args.global_steps,
                    "lr": 3e-5, "hidden_weight": 0.1, "checkpoint_every": 25,
                    # learning rates per row, chosen on layer 5 of SmolLM2 (60 local steps, held-out error):
                    # 2:4 and 2:4 + int4 learn fastest at 3e-3, int4 alone at 1e-3; int4 scales at ~3e-5
                    "local_lr": {"recover_24": 3e-3, "recover_24_w4a16_g64": 3e-3, "qd_w4a16_g64": 1e-3,
                                 "diffq_w4a16_g64": 1e-3},
                    "scale_lr_mult": {"recover_24_w4a16_g64": 0.01, "qd_w4a16_g64": 0.03, "diffq_w4a16_g64": 0.3}},
    }
    return s


# ----------------------------------------------------------------------------- workers (one process per row)
def _torch_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def worker(row: str, work: Path, cfg: dict) -> dict:
    """Compress (or recover) one row in this process and save its checkpoint to work/row/model."""
    from safetensors.torch import load_file

    from llmcompress.models import load, save
    from llmcompress.oneshot import PruneConfig, QuantizeConfig, prune_model, quantize_model

    _torch_threads(cfg["threads"])
    t_start = time.perf_counter()
    out = work / row
    tokens = load_file(str(work / "calib.safetensors"))["input_ids"]
    calib = dict(num_samples=cfg["num_samples"], seq_len=cfg["seq_len"])
    _, kind, base = ROWS[row]
    if kind == "recover":
        return _recover_worker(row, base, work, cfg, t_start)
    graph = load("default")
    t0 = time.perf_counter()
    reports = []
    sparse = PruneConfig(method="sparsegpt", **calib)
    g64 = QuantizeConfig(method="gptq", group_size=64, symmetric=True, act_order=True, **calib)
    steps = {
        "magnitude_24": [PruneConfig(method="magnitude", **calib)],
        "wanda_24": [PruneConfig(method="wanda", **calib)],
        "sparsegpt_24": [sparse],
        "rtn_w4a16_g64": [QuantizeConfig(method="rtn", group_size=64, symmetric=True, **calib)],
        "gptq_w4a16_g64": [g64],
        "w8a8": [QuantizeConfig(scheme="w8a8", method="gptq", smoothquant_alpha=SMOOTHING, **calib)],
        "sparsegpt_24_gptq_w4a16_g64": [sparse, g64],
        "rtn_w4a16_g32_asym": [QuantizeConfig(method="rtn", group_size=32, symmetric=False, **calib)],
    }[row]
    for step in steps:
        apply = prune_model if isinstance(step, PruneConfig) else quantize_model
        reports.append(apply(graph, tokens, step))
    seconds = time.perf_counter() - t0
    save(graph, out / "model", overwrite=True)
    return {"compress_s": seconds, "process_s": time.perf_counter() - t_start, "reports": reports}


def _recover_worker(row: str, base: str, work: Path, cfg: dict, t_start: float) -> dict:
    from safetensors.torch import load_file

    from llmcompress.models import load, save
    from llmcompress.recover import RecoverConfig, recover

    if not (work / base / "model").exists():
        raise SystemExit(f"{row} recovers {base}: run that row first (--rows {base},{row})")
    r = cfg["recover"]
    student, teacher = load(str(work / base / "model")), load(str(work / "dense"))
    tokens = load_file(str(work / "train.safetensors"))["input_ids"]
    rc = RecoverConfig(num_samples=r["num_samples"], seq_len=r["seq_len"], batch_size=r["batch_size"],
                       quantizer="differentiable" if row.startswith("diffq") else "ste",
                       scale_lr_mult=r["scale_lr_mult"].get(row, 1.0),
                       local_steps=r["local_steps"], global_steps=r["global_steps"], local_lr=r["local_lr"][row],
                       lr=r["lr"], hidden_weight=r["hidden_weight"], checkpoint_every=r["checkpoint_every"])
    t0 = time.perf_counter()
    report = recover(student, teacher, tokens, rc, work / row / "checkpoint")
    seconds = time.perf_counter() - t0
    save(student, work / row / "model", overwrite=True)
    return {"compress_s": seconds, "process_s": time.perf_counter() - t_start, "reports": [report],
            "budget": {k: v for k, v in r.items() if k != "checkpoint_every"}}


# ----------------------------------------------------------------------------- driver
def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss is not used: after fork + exec it starts
    from the parent's RSS, so a light row would inherit the driver's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run cmd; -> (exit code, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return code, time.perf_counter() - t0


def prepare(work: Path, cfg: dict) -> None:
    """The dense model as a plain Llama folder, the calibration / training token ids, the held-out stream."""
    from safetensors.torch import save_file

    from llmcompress.data import Corpus, DataConfig
    from llmcompress.models import load, save
    from llmcompress.models.loading import cache_dir

    work.mkdir(parents=True, exist_ok=True)
    graph = load("default")
    if not (work / "dense").exists():
        save(graph, work / "dense")
    corpus = Corpus(DataConfig(source=str(DATA), heldout_rows=200, max_rows=1000, seq_len=cfg["seq_len"], seed=0),
                    graph.tokenizer, cache=cache_dir())
    calib = corpus.train_batches(cfg["num_samples"], cfg["seq_len"])
    r = cfg["recover"]
    train = corpus.train_batches(r["num_samples"], r["seq_len"])
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
    save_file({"input_ids": train.contiguous()}, str(work / "train.safetensors"))
    save_file({"input_ids": corpus.heldout_stream().contiguous()}, str(work / "heldout.safetensors"))


def evaluate_row(folder: Path, work: Path, cfg: dict) -> dict:
    """Held-out perplexity with our protocol; our loader, or transformers for formats it does not read."""
    import torch
    from safetensors.torch import load_file

    from llmcompress.evaluation import perplexity
    from llmcompress.models import load

    try:
        model, loader = load(str(folder)), "llmcompress"
    except ValueError as err:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        loader = f"transformers ({err})"
    stream = load_file(str(work / "heldout.safetensors"))["input_ids"]
    ppl = perplexity(model, stream, cfg["seq_len"], cfg["eval_windows"])
    return {"perplexity": ppl["perplexity"], "ppl_protocol": ppl["protocol"], "loader": loader}


def run_row(row: str, work: Path, cfg: dict, args) -> dict:
    label, kind, base = ROWS[row]
    log = work / f"{row}.log"
    if kind == "recover" and not args.resume:
        shutil.rmtree(work / row / "checkpoint", ignore_errors=True)
    (work / row).mkdir(parents=True, exist_ok=True)
    result_file = work / row / "result.json"
    if kind == "dense":
        out = {"row": row, "label": label, **evaluate_row(work / "dense", work, cfg)}
        (work / row / "row.json").write_text(json.dumps({"settings": cfg, "commit": git_commit(), "result": out}))
        return out
    if kind == "peer":
        cmd = [args.peer_python, str(HERE / "peer_llmcompressor.py"), "--method", PEER_METHOD[row],
               "--model", str(work / "dense"), "--calib", str(work / "calib.safetensors"),
               "--out", str(work / row / "model"), "--result", str(result_file), "--group-size", "64"]
        cmd += ["--smoothing", str(SMOOTHING)] if row == "peer_w8a8" else []
        cmd += ["--threads", str(cfg["threads"])] if cfg["threads"] else []
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row, "--work", str(work),
               "--settings", json.dumps(cfg)]
    code, wall = _spawn(cmd, log)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"row": row, "label": label, "error": f"exit {code}: {tail[0]} (log: {log})"}
    inner = json.loads(result_file.read_text())
    out = {"row": row, "label": label, "wall_s": wall, "peak_rss_mb": inner["peak_rss_mb"],
           "compress_s": inner.get("compress_s", inner.get("oneshot_s")), "detail": inner}
    out |= evaluate_row(work / row / "model", work, cfg)
    (work / row / "row.json").write_text(json.dumps({"settings": cfg, "commit": git_commit(), "result": out}, indent=2))
    return out


def finished_row(row: str, work: Path, cfg: dict) -> dict | None:
    """A row measured by an earlier run with the same settings (--reuse), tagged with that run's commit."""
    f = work / row / "row.json"
    if not f.exists():
        return None
    saved = json.loads(f.read_text())
    relevant = (lambda c: c) if ROWS[row][1] == "recover" else (lambda c: {k: v for k, v in c.items() if k != "recover"})
    if relevant(saved["settings"]) != relevant(cfg):
        return None
    return saved["result"] | {"measured_at": saved["commit"]}


def earlier_row(row: str, path: Path, cfg: dict) -> dict | None:
    """A one-shot or peer row of an earlier results JSON measured with the same settings (--reuse-json)."""
    report = json.loads(path.read_text())
    relevant = lambda c: {k: v for k, v in c.items() if k != "recover"}  # noqa: E731
    if ROWS[row][1] == "recover" or relevant(report["settings"]) != relevant(cfg):
        return None
    for r in report["rows"]:
        if r["row"] == row and "perplexity" in r:
            keep = {k: v for k, v in r.items() if k not in ("x_dense", "x_peer", "target")}
            return keep | {"measured_at": r.get("measured_at") or report["commit"]}
    return None


def compare(rows: list[dict]) -> None:
    """Ratios to dense and to the peer, and whether each target is met."""
    by = {r["row"]: r for r in rows}
    dense = by.get("dense", {}).get("perplexity")
    for r in rows:
        if "perplexity" not in r:
            continue
        if dense:
            r["x_dense"] = r["perplexity"] / dense
        peer = by.get(PEER_OF.get(r["row"], ""), {})
        if "perplexity" in peer:
            r["x_peer"] = r["perplexity"] / peer["perplexity"]
            met = r["x_peer"] <= 1.02 and r["wall_s"] <= peer["wall_s"] and r["peak_rss_mb"] <= peer["peak_rss_mb"]
            r["target"] = f"<= 1.02x peer ppl, time, RSS: {'met' if met else 'NOT met'}"
        if r["row"] in DENSE_TARGETS and dense:
            t = DENSE_TARGETS[r["row"]]
            both = [r["target"]] if "target" in r else []  # a row with a peer target keeps it beside this one
            r["target"] = "; ".join([f"<= {t}x dense: {'met' if r['x_dense'] <= t else 'NOT met'}"] + both)


def markdown(report: dict) -> str:
    from llmcompress.pipeline import markdown_table

    m, s = report["machine"], report["settings"]
    rows = [{**r, "wall_s": r.get("wall_s"), "peak_rss_mb": r.get("peak_rss_mb")} for r in report["rows"]]
    cols = ["label", "perplexity", "x_dense", "x_peer", "compress_s", "wall_s", "peak_rss_mb", "target", "measured_at", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    rec = s["recover"]
    protocol = next((r["ppl_protocol"] for r in rows if "ppl_protocol" in r), "")
    peer = next((r["detail"]["versions"] for r in rows if r["row"].startswith("peer_") and "detail" in r), None)
    return (f"# 2:4 sparsity and quantization: one-shot, recovered, and llm-compressor\n\n"
            f"commit {report['commit']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}"
            f"{' (SMOKE settings: not a result)' if report['smoke'] else ''}\n\n"
            + markdown_table(rows, cols) + "\n\n"
            f"- calibration: {s['num_samples']} sequences of {s['seq_len']} tokens from the first 800 rows "
            f"(the same token ids for both tools)\n"
            f"- perplexity: {protocol}\n"
            f"- wall_s / peak_rss_mb: the row's whole process (load, compress, save), one process per row; "
            f"compress_s: the compression (or recovery) alone\n"
            f"- recovery budget per row: local {rec['local_steps']} steps per layer x {rec['batch_size']} x "
            f"{rec['seq_len']} tokens, then global {rec['global_steps']} steps x {rec['batch_size']} x "
            f"{rec['seq_len']} tokens; AdamW, local lr {rec['local_lr']}, global lr {rec['lr']}, int4 scale lr "
            f"multiple {rec.get('scale_lr_mult')}, hidden weight {rec['hidden_weight']}\n"
            f"- W4A16 rows: symmetric int4, group 64 (as the peer); GPTQ with static activation order on both "
            f"sides; W8A8: SmoothQuant {SMOOTHING} then GPTQ, dynamic per-token int8 activations\n"
            f"- peer: llm-compressor {peer or '(not run)'}\n"
            f"- reproduce: `bash benchmarks/peer_setup.sh && python benchmarks/sparsity_quant.py`\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks that every row runs end to end")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-sparsity-quant"))
    ap.add_argument("--peer-python", default="/tmp/peer-venv/bin/python")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every row, ours and the peer's")
    ap.add_argument("--eval-windows", type=int, default=64,
                    help="held-out 512-token windows scored per row (0: all 184, ~4 min a row on 2 cores)")
    ap.add_argument("--recover-samples", type=int, default=32, help="recovery: training sequences of 512 tokens")
    ap.add_argument("--local-steps", type=int, default=50, help="recovery: steps per decoder layer")
    ap.add_argument("--global-steps", type=int, default=10, help="recovery: end-to-end steps")
    ap.add_argument("--reuse-json", default=None,
                    help="also keep rows from this earlier results JSON (same settings; each keeps its commit)")
    ap.add_argument("--reuse-json-rows", default=",".join(PEER_METHOD),
                    help="the rows --reuse-json may supply (default: the peer rows)")
    ap.add_argument("--resume", action="store_true", help="keep recovery checkpoints of an interrupted run "
                                                          "(the timings then cover only the resumed part)")
    ap.add_argument("--reuse", action="store_true", help="keep rows an earlier run finished with the same settings "
                                                         "(each keeps the commit it was measured at)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; smoke: WORK/results)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    if args.worker:
        cfg = json.loads(args.settings)
        result = worker(args.worker, work, cfg) | {"peak_rss_mb": peak_rss_mb()}
        (work / args.worker / "result.json").write_text(json.dumps(result, indent=2))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    supplied = set(args.reuse_json_rows.split(",")) if args.reuse_json else set()
    if any(ROWS[r][1] == "peer" and r not in supplied for r in rows) and not Path(args.peer_python).exists():
        ap.error(f"{args.peer_python} does not exist; run `bash benchmarks/peer_setup.sh` first")
    _torch_threads(args.threads)
    cfg = settings(args)
    t0 = time.perf_counter()
    prepare(work, cfg)
    results = []
    for row in rows:
        r = (finished_row(row, work, cfg) if args.reuse else None) \
            or (earlier_row(row, Path(args.reuse_json), cfg)
                if args.reuse_json and row in args.reuse_json_rows.split(",") else None) \
            or run_row(row, work, cfg, args)
        results.append(r)
        shown = f"ppl {r['perplexity']:.3f}" if "perplexity" in r else r.get("error")
        print(f"{row}: {shown}" + (f", {r['wall_s']:.0f} s, {r['peak_rss_mb']:.0f} MiB" if "wall_s" in r else ""),
              flush=True)
    compare(results)
    report = {"benchmark": "sparsity_quant", "commit": git_commit(), "machine": machine(), "smoke": args.smoke,
              "settings": cfg, "wall_s": time.perf_counter() - t0, "rows": results}
    md = markdown(report)
    out = Path(args.out) if args.out else (work / "results" if args.smoke else None)
    js, mdp = write_results("sparsity_quant", report, md, *([out] if out else []))
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
