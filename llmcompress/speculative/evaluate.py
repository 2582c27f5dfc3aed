"""Measure a draft for speculative decoding: alpha, tau, cost ratio c, predicted and measured speed-up.

Protocol (batch 1, greedy unless `temperature` > 0): every prompt is decoded by the target alone (our KV
cache loop) and by speculative decoding at each gamma; wall-clock time covers the whole decode, prompt
prefill included, summed over prompts. c is the median time of one cached single-token draft step over
one target step at the prompts' length. Predicted speed-up uses the measured alpha and c in Leviathan
et al.'s formula; "identical" says whether every speculative output equals the target-only output.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmcompress.speculative import metrics
from llmcompress.speculative.decode import (DecodeStats, feed, hf_assisted_decode, prefill, speculative_decode,
                                            target_decode)


class SpecEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gammas: list[int] = Field(default_factory=lambda: [1, 2, 4], description="draft tokens per target call")
    prompts: int = Field(4, gt=0, description="held-out prompts to decode")
    new_tokens: int = Field(32, gt=0, description="tokens generated per prompt")
    prompt_tokens: int = Field(64, gt=0, description="prompts are cut to at most this many tokens")
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: speculative sampling")
    seed: int = 0
    cost_steps: int = Field(16, gt=0, description="decode steps timed per model for the cost ratio c")
    compare_hf: bool = Field(False, description="also time transformers' generate(assistant_model=...) per gamma")

    @field_validator("gammas")
    @classmethod
    def _positive(cls, v):
        if not v or any(g < 1 for g in v):
            raise ValueError("gammas must be a non-empty list of integers >= 1")
        return v


def parse_gammas(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        gammas = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"--gammas {text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not gammas or min(gammas) < 1:
        raise ValueError(f"--gammas {text!r} must list integers >= 1")
    return gammas


def prompts_from_texts(tokenizer, texts: list[str], n: int, max_tokens: int) -> list[torch.Tensor]:
    """The first `n` non-empty texts as prompts of at most `max_tokens` tokens each. -> n x [1, P]"""
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            prompts.append(torch.tensor([ids]))
        if len(prompts) == n:
            break
    if not prompts:
        raise ValueError("no prompts: the held-out texts are empty; give data with held-out rows")
    return prompts


@torch.no_grad()
def step_time(model, prompt: torch.Tensor, steps: int) -> float:
    """Median seconds of one cached single-token decode step after `prompt` [1, P]."""
    seq = prompt.to(next(model.parameters()).device)
    cache = prefill(model, seq)
    tok = feed(model, seq, cache)[-1:].argmax(-1, keepdim=True)  # [1, 1]; warm-up, the cache now holds seq
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _sync(seq.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def evaluate_speculative(target, draft, prompts: list[torch.Tensor], cfg: SpecEvalConfig,
                         progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The report of the module doc for `draft` proposing to `target` on `prompts` (each [1, P])."""
    from llmcompress.speculative.draft_init import check_compatible

    check_compatible(target, draft)
    target.eval(), draft.eval()
    device = next(target.parameters()).device
    eos = getattr(getattr(target, "tokenizer", None), "eos_token_id", None)
    prompts = [p[:, : cfg.prompt_tokens] for p in prompts[: cfg.prompts]]
    total = len(prompts) * (1 + len(cfg.gammas))
    done = 0

    def tick(label):
        nonlocal done
        done += 1
        if progress:
            progress(label, done, total)

    def gen(seed):
        return torch.Generator(device="cpu").manual_seed(seed)

    target_decode(target, prompts[0], 2)  # warm-up (allocator, kernels)
    speculative_decode(target, draft, prompts[0], 2, gamma=1)
    base_out, base_time = [], 0.0
    for i, p in enumerate(prompts):
        (out, _), dt = _timed(lambda: target_decode(target, p, cfg.new_tokens, cfg.temperature, gen(cfg.seed + i),
                                                    eos), device)
        base_out.append(out.cpu())
        base_time += dt
        tick("speculative: target alone")
    new_tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(base_out, prompts))
    c = step_time(draft, prompts[0], cfg.cost_steps) / step_time(target, prompts[0], cfg.cost_steps)
    rows = []
    for gamma in cfg.gammas:
        stats, spec_time, identical = DecodeStats(gamma=gamma), 0.0, True
        for i, p in enumerate(prompts):
            (out, st), dt = _timed(lambda: speculative_decode(target, draft, p, cfg.new_tokens, gamma, cfg.temperature,
                                                              gen(cfg.seed + i), eos), device)
            stats = stats.merge(st)
            spec_time += dt
            identical &= torch.equal(out.cpu(), base_out[i])
            tick(f"speculative: gamma {gamma}")
        alpha = min(max(stats.alpha, 0.0), 1.0)
        rows.append(stats.as_dict() | {
            "expected_tau": metrics.expected_tokens(alpha, gamma),
            "predicted_speedup": metrics.speedup(alpha, gamma, c),
            "measured_speedup": base_time / spec_time,
            "seconds": spec_time,
            "identical_output": identical if cfg.temperature == 0 else None,  # sampling: equal only in law
        })
        if cfg.compare_hf:
            hf_time, hf_identical = 0.0, True
            for i, p in enumerate(prompts):
                out, dt = _timed(lambda: hf_assisted_decode(target, draft, p, cfg.new_tokens, gamma, cfg.temperature,
                                                            eos), device)
                hf_time += dt
                hf_identical &= torch.equal(out.cpu(), base_out[i])
            rows[-1] |= {"hf_seconds": hf_time, "hf_measured_speedup": base_time / hf_time,
                         "hf_identical_output": hf_identical if cfg.temperature == 0 else None}
    alpha = sum(r["alpha"] for r in rows) / len(rows)
    return {
        "draft_layers": len(draft.model.layers),
        "target_layers": len(target.model.layers),
        "prompts": len(prompts),
        "new_tokens_per_prompt": cfg.new_tokens,
        "temperature": cfg.temperature,
        "cost_ratio_c": c,
        "target_seconds": base_time,
        "target_tok_s": new_tokens / base_time,
        "alpha": alpha,
        "optimal_gamma_predicted": metrics.optimal_gamma(alpha, c),
        "gammas": rows,
        "protocol": (f"batch 1, {'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}'}, "
                     f"{len(prompts)} held-out prompts of <= {cfg.prompt_tokens} tokens, {cfg.new_tokens} new tokens "
                     "each; wall-clock includes prefill; c = median cached decode-step time draft/target; "
                     "alpha = mean sum min(p, q) (greedy: argmax agreement) on the decoded path"),
    }


def evaluate_draft(target, draft_spec: str, corpus, cfg: SpecEvalConfig,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Build the draft `draft_spec` (a model, or layers:K / important:K of `target`) and measure it on the
    first held-out documents of `corpus` (a `llmcompress.data.Corpus`) as prompts."""
    from llmcompress.speculative.draft_init import init_draft

    if getattr(target, "tokenizer", None) is None:
        raise ValueError("speculative evaluation needs the target's tokenizer; the model folder has none")
    calib = corpus.train_batches(8, 128) if draft_spec.startswith("important:") else None
    draft = init_draft(target, draft_spec, calib)
    prompts = prompts_from_texts(target.tokenizer, corpus.heldout_texts, cfg.prompts, cfg.prompt_tokens)
    report = evaluate_speculative(target, draft, prompts, cfg, progress)
    return {"draft": draft_spec, "draft_init_layers": getattr(draft, "init_layers", None)} | report


__all__ = ["SpecEvalConfig", "evaluate_draft", "evaluate_speculative", "parse_gammas", "prompts_from_texts",
           "step_time"]
