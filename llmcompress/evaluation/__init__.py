"""Evaluation: held-out perplexity, lm-eval tasks on our model object, and speed on this device."""

from __future__ import annotations

import functools
import math
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmcompress.models import count_params


class EvalConfig(BaseModel):
    """What `eval` measures. These fields are the `eval` stage of a recipe and the CLI's options."""

    model_config = ConfigDict(extra="forbid")
    perplexity: bool = True
    ppl_seq_len: int = Field(512, gt=1, description="window length of the perplexity protocol")
    ppl_max_windows: int | None = Field(None, gt=0, description="evaluate only the first N windows")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names or local .jsonl MC files")
    task_limit: int | None = Field(None, gt=0, description="rows per lm-eval task")
    speed: bool = True
    prefill_batch: int = Field(1, gt=0)
    prefill_len: int = Field(512, gt=0)
    decode_tokens: int = Field(64, gt=0)
    repeats: int = Field(3, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per forward pass for perplexity and lm-eval")


# ----------------------------------------------------------------------------- perplexity
def perplexity(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity over non-overlapping windows of a held-out token stream.

    Each window of `seq_len` tokens is scored independently (no context carried across windows); every
    token but the first of each window is predicted. ppl = exp(mean NLL over all predicted tokens).
    """
    n = stream.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"held-out text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    windows = stream[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = windows[i: i + batch_size].to(device)  # [B, S]
            logits = model(batch).logits.float()  # [B, S, V]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                     reduction="sum")
            nll += loss.item()
            count += batch[:, 1:].numel()
            if progress:
                progress(min(i + batch_size, n), n)
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "protocol": f"{n} non-overlapping windows of {seq_len} tokens from the held-out documents "
                    f"(joined by EOS); every token but each window's first is predicted; "
                    f"ppl = exp(mean NLL over {count} tokens)",
    }


# ----------------------------------------------------------------------------- lm-eval
def local_mc_task(path: Path, limit: int | None = None) -> dict:
    """An lm-eval task config for a multiple-choice JSONL file of {input, choices, gold} rows."""
    if not path.exists():
        raise ValueError(f"task file {path} does not exist")
    return {
        "task": path.stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{input}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def lm_eval_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                  base_dir: Path | None = None) -> dict:
    """Run lm-eval through its Python API on our model object. -> {task: {metric: value}}"""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs = []
    for t in tasks:
        p = Path(t).expanduser()
        if base_dir is not None and not p.is_absolute() and not p.exists():
            p = base_dir / p
        specs.append(local_mc_task(p) if t.endswith(".jsonl") else t)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=getattr(model.config, "max_position_embeddings", 2048))
    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):  # library code stays quiet
        setattr(lm, method, functools.partial(getattr(lm, method), disable_tqdm=True))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False,
                                      bootstrap_iters=0, verbosity="WARNING")
    except KeyError as err:
        raise ValueError(f"unknown lm-eval task {err}; pass an lm-eval task name or a local .jsonl file") from None
    out = {}
    for name, metrics in res["results"].items():
        out[name] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
        out[name]["rows"] = res.get("n-samples", {}).get(name, {}).get("effective")
    return out


# ----------------------------------------------------------------------------- speed
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(model, prefill_batch: int = 1, prefill_len: int = 512, decode_tokens: int = 64,
                  repeats: int = 3, vocab_size: int | None = None) -> dict:
    """Prefill latency at (batch, length), greedy decode tokens/s with a KV cache, and peak memory."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefill_batch, prefill_len), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(prompt)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
        one = prompt[:1, :16]
        for _ in range(repeats):
            cache = DynamicCache()
            out = model(one, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            _sync(device)
            decode.append(decode_tokens / (time.perf_counter() - t0))
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {
        "device": device_name(device),
        "prefill_batch": prefill_batch,
        "prefill_len": prefill_len,
        "prefill_ms": 1000 * statistics.median(prefill),
        "prefill_ms_spread": 1000 * (max(prefill) - min(prefill)),
        "decode_batch": 1,
        "decode_tokens": decode_tokens,
        "decode_tok_s": statistics.median(decode),
        "decode_tok_s_spread": max(decode) - min(decode),
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": peak_kind,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- one call
def evaluate(model, tokenizer, cfg: EvalConfig, heldout: torch.Tensor | None = None,
             base_dir: Path | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Everything `cfg` asks for, as a JSON-ready report."""
    report: dict = {"params": count_params(model), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    model.eval()
    if cfg.perplexity:
        if heldout is None:
            raise ValueError("perplexity needs held-out text; give data with held-out rows or set perplexity: false")
        cb = (lambda i, n: progress("perplexity", i, n)) if progress else None
        report["perplexity"] = perplexity(model, heldout, cfg.ppl_seq_len, cfg.ppl_max_windows, cfg.batch_size, cb)
    if cfg.tasks:
        if progress:
            progress("lm-eval", 0, 1)
        report["tasks"] = lm_eval_tasks(model, tokenizer, cfg.tasks, cfg.task_limit, cfg.batch_size, base_dir)
    if cfg.speed:
        if progress:
            progress("speed", 0, 1)
        report["speed"] = measure_speed(model, cfg.prefill_batch, cfg.prefill_len, cfg.decode_tokens, cfg.repeats)
    return report


__all__ = ["EvalConfig", "evaluate", "lm_eval_tasks", "local_mc_task", "measure_speed", "perplexity"]
