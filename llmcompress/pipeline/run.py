"""Run a recipe: stages in order, each writing its checkpoint and report; unchanged stages are skipped.

Layout of a run folder:
  run.json                 the validated recipe of the last run
  NN-<stage>/stage.json    the stage's input key, timing and report
  NN-<stage>/model/        its output checkpoint (stages that change the model)
  summary.md, summary.json the comparison of all `eval` stages
A stage's key hashes its own recipe section, the data section and the key of its input (the previous
stage's key, or the model's identity), so a rerun skips exactly the stages whose inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcompress.data import Corpus
from llmcompress.models import load, save
from llmcompress.models.loading import atomic_dir, cache_dir, resolve
from llmcompress.pipeline.recipe import Recipe
from llmcompress.stages import StageContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StageResult:
    label: str
    type: str
    folder: Path
    skipped: bool
    seconds: float
    report: dict


@dataclass
class RunResult:
    output: Path
    stages: list[StageResult] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)


def model_identity(spec: str) -> str:
    """A key for the recipe's model: the spec plus the size and mtime of its files."""
    path = resolve(spec)
    parts = [spec]
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def prepare_output(out: Path, overwrite: bool) -> None:
    """An existing run folder is resumed; anything else that exists is refused unless `overwrite`."""
    if out.exists():
        if overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        elif out.is_file():
            raise FileExistsError(f"output {out} is a file; choose another output folder")
        elif any(out.iterdir()) and not (out / "run.json").exists():
            raise FileExistsError(f"output folder {out} exists and is not an llmcompress run; "
                                  "pass --overwrite or choose another folder")


def run_recipe(recipe: Recipe, base_dir: Path, from_stage: str | None = None, overwrite: bool = False,
               progress=None, on_stage=None) -> RunResult:
    """Run `recipe`. `progress(label, done, total)` reports work inside a stage; `on_stage(result)`
    is called after each stage."""
    labels = [s.label for s in recipe.stages]
    if from_stage is not None and from_stage not in labels:
        raise ValueError(f"--from {from_stage!r} is not a stage of this recipe; stages: {', '.join(labels)}")
    out = Path(recipe.output).expanduser()  # relative to the working directory, like any CLI output
    prepare_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(recipe.model_dump_json(indent=2))

    dtype, device = DTYPES[recipe.dtype], recipe.device
    progress = progress or (lambda label, done, total: None)
    state = {"graph": None, "checkpoint": recipe.model}

    def current_graph():
        if state["graph"] is None:
            progress(f"loading {state['checkpoint']}", 0, 1)
            state["graph"] = load(state["checkpoint"], dtype=dtype, device=device)
        return state["graph"]

    def teacher():  # a copy of its own: stages change the working graph in place
        return load(recipe.model, dtype=dtype, device=device)

    def corpus():
        # synthetic text always comes from the recipe's original model, also when a run resumes later on
        teacher_model = ctx.teacher if recipe.data.source == "synthetic" else None
        return Corpus(recipe.data, current_graph().tokenizer, teacher=teacher_model, base_dir=base_dir,
                      cache=cache_dir())

    ctx = StageContext(corpus_fn=corpus, teacher_fn=teacher, base_dir=base_dir, progress=progress)
    key = _key("model", model_identity(recipe.model), recipe.dtype)
    result, forced = RunResult(output=out), False
    for i, stage in enumerate(recipe.stages):
        folder = out / f"{i:02d}-{stage.label}"
        key = _key(key, stage.model_dump_json(), recipe.data.model_dump_json())
        forced = forced or stage.label == from_stage
        done = folder / "stage.json"
        if not forced and done.exists() and json.loads(done.read_text()).get("key") == key:
            record = json.loads(done.read_text())
            if stage.changes_model:
                state["graph"], state["checkpoint"] = None, str(folder / "model")
            sr = StageResult(stage.label, stage.type, folder, True, record["seconds"], record["report"])
        else:
            graph = current_graph()
            t0 = time.perf_counter()
            graph, report = stage.run(graph, ctx)
            seconds = time.perf_counter() - t0
            with atomic_dir(folder, overwrite=True) as tmp:
                if stage.changes_model:
                    save(graph, tmp / "model")
                (tmp / "report.json").write_text(json.dumps(report, indent=2))
                (tmp / "stage.json").write_text(json.dumps(
                    {"key": key, "type": stage.type, "config": stage.model_dump(), "seconds": seconds,
                     "report": report}, indent=2))
            state["graph"] = graph
            if stage.changes_model:
                state["checkpoint"] = str(folder / "model")
            sr = StageResult(stage.label, stage.type, folder, False, seconds, report)
            forced = True  # every later stage's input has changed
        result.stages.append(sr)
        if on_stage:
            on_stage(sr)
    result.summary = summarize(result)
    write_summary(out, result.summary)
    return result


def summarize(result: RunResult) -> list[dict]:
    """One row per eval stage: the model it measured and the headline numbers."""
    rows, model_after = [], "input model"
    for sr in result.stages:
        if sr.type != "eval":
            model_after = f"after {sr.label}"
            continue
        r = sr.report
        row = {"stage": sr.label, "model": model_after, "params": r.get("params")}
        if "perplexity" in r:
            row["perplexity"] = r["perplexity"]["perplexity"]
            row["ppl_protocol"] = r["perplexity"]["protocol"]
        if "speed" in r:
            s = r["speed"]
            row |= {"decode_tok_s": s["decode_tok_s"], "prefill_ms": s["prefill_ms"], "device": s["device"],
                    "speed_setting": f"prefill {s['prefill_batch']}x{s['prefill_len']}, decode batch 1 "
                                     f"x {s['decode_tokens']} tokens, {s['threads']} threads"}
        for task, metrics in r.get("tasks", {}).items():
            row[f"{task}.acc"] = metrics.get("acc")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(out: Path, rows: list[dict]) -> None:
    if not rows:
        return
    skip = {"ppl_protocol", "speed_setting", "device"}
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in skip]
    notes = []
    for key in ("ppl_protocol", "speed_setting", "device"):
        vals = sorted({r[key] for r in rows if key in r})
        if vals:
            notes.append(f"- {key.replace('_', ' ')}: " + "; ".join(vals))
    (out / "summary.md").write_text(markdown_table(rows, columns) + "\n\n" + "\n".join(notes) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
