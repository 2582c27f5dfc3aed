"""ZipLM end to end: one calibration pass, a family of models for several speed-up targets.

1. Database: structured OBS levels per layer (`database.build_database`).
2. Costs: the latency of every (layer part, level) from the cost table of the target device.
3. Search: per target speed-up s, minimise the summed (normalised) error subject to
       head + Σ_layers (attn + ffn - empty) <= dense / s        (exact DP over discretised time)
   Optionally (`error_scale: removal_kl`) each part's error curve is first rescaled so that removing the part
   costs the dense model's KL without that part (Puzzle's replace-one-block score): OBS errors are local, so
   without it an attention block and an FFN block that are each removed entirely look equally costly.
   Optionally (`search_steps`) the per-part errors are first weighted by a sensitivity search that tunes the
   weights on the stitched model's KL to the dense model (`sensitivity.sensitivity_search`, SPDY-style).
4. Realise each choice (optionally re-running OBS on inputs propagated through the pruned layers).
5. Optionally measure each realised model on this device and, when the measured speed-up misses the target,
   rescale the budget by measured / requested and search again (`refine` rounds): the table predicts relative
   costs well, the end-to-end run corrects what it misses (e.g. cache effects of the whole model).

Gradual mode (`gradual`) reaches the targets in sequence instead of each from the dense model: prune to the
first target, distil the result from the dense model (per-layer normalised hidden-state MSE + logit KL,
`puzzle.gkd.train_gkd`, `gradual_tokens` per target), rebuild the database on the distilled model (its levels
are the search's sizes at most each layer's current width) and prune it to the next target, and so on. Speed-ups
stay relative to the dense model. Each model of the family is then the distilled one.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmcompress.models.graph import AttentionConfig, ModelGraph, count_params
from llmcompress.prune.database import Database, part_costs, part_errors, realise, realise_uniform
from llmcompress.prune.search import KnapsackDP
from llmcompress.prune.sensitivity import KLProbe, sensitivity_search, torch_threads, weighted

Progress = Callable[[str, int, int], None]


class ZipLMConfig(BaseModel):
    """The `ziplm` stage's recipe section and the CLI's options."""

    model_config = ConfigDict(extra="forbid")
    speedups: list[float] = Field(default_factory=lambda: [1.25, 1.5, 2.0], description="target speed-ups")
    metric: Literal["decode", "prefill"] = Field("decode", description="latency the speed-up refers to")
    batch: int = Field(1, gt=0, description="batch size of that latency (a batch of the cost table)")
    num_samples: int = Field(64, gt=0, description="calibration sequences")
    seq_len: int = Field(512, gt=1)
    ffn_steps: int = Field(16, gt=0, description="FFN levels: parent size down to 0 in this many steps")
    ffn_multiple: int = Field(32, gt=0, description="FFN sizes are multiples of this")
    normalise: Literal["residual", "output", "none"] = Field(
        "output", description="per-part OBS errors divided by the part's output energy (output), by the layer "
                              "input's residual energy (residual; empties middle layers on SmolLM2), or not (none)")
    sequential: bool = Field(True, description="re-run OBS for each target on inputs propagated through the "
                                               "already-pruned layers")
    refine: int = Field(1, ge=0, description="rounds of measuring each model and rescaling its budget")
    refine_tolerance: float = Field(0.03, ge=0, description="no refinement when measured is this close (relative)")
    measure_rounds: int = Field(3, gt=0, description="rounds of back-to-back (dense, pruned) timing per measured "
                                                     "speed-up; the median ratio is reported")
    percdamp: float = Field(0.01, gt=0)
    batch_size: int = Field(8, gt=0)
    buckets: int = Field(20000, gt=100, description="resolution of the DP's time axis")
    error_scale: Literal["none", "removal_kl"] = Field(
        "none", description="removal_kl: rescale each part's OBS error curve so that removing the part entirely costs "
                            "KL(dense || dense without that part) on the search's calibration windows; attention and "
                            "FFN, early and late layers then share one scale (one evaluation per part; needs "
                            "calibration tokens; makes `normalise` irrelevant)")
    search_steps: int = Field(0, ge=0, description="steps of the sensitivity search per target (SPDY-style "
                                                   "weights on the DP's per-part errors, tuned on the stitched "
                                                   "model's KL to the dense one; 0: the plain DP)")
    search_samples: int = Field(8, gt=0, description="sensitivity search: calibration sequences it scores on")
    search_seq_len: int = Field(256, gt=1, description="sensitivity search: tokens per scored sequence")
    search_positions: int = Field(128, ge=0, description="sensitivity search: scored last positions (0: all)")
    search_spread: float = Field(2.0, ge=1, description="sensitivity search: weights resampled in [1/s, s]")
    search_mutate: float = Field(0.1, gt=0, le=1, description="sensitivity search: largest fraction of parts "
                                                                 "resampled per step")
    search_seed: int = Field(0, description="sensitivity search: random seed")
    search_threads: int = Field(0, ge=0, description="torch threads for the sensitivity search (0: unchanged); "
                                                     "timings keep the caller's setting")
    gradual: bool = Field(False, description="reach the targets in sequence, distilling from the dense model "
                                             "between them (module doc)")
    gradual_tokens: int = Field(65536, ge=0, description="gradual: distillation tokens after each target")
    gradual_lr: float = Field(1e-4, gt=0, description="gradual: distillation learning rate")
    gradual_batch: int = Field(4, gt=0, description="gradual: distillation batch size (sequences)")

    @field_validator("speedups")
    @classmethod
    def _speedups(cls, v):
        if not v or any(s < 1 for s in v):
            raise ValueError("speedups must be a non-empty list of numbers >= 1, e.g. [1.25, 1.5, 2.0]")
        return sorted(v)


def layer_choice(db: Database, solution: list[int]) -> list[tuple[int, int]]:
    """DP option indices (attn, ffn per layer; levels in descending order) -> (KV groups, channels) per layer."""
    attn, ffn = db.levels("attn"), db.levels("ffn")
    return [(attn[i][solution[2 * i]], ffn[i][solution[2 * i + 1]]) for i in range(len(db.layers))]


def removal_kl(graph: ModelGraph, db: Database, probe: KLProbe, progress: Progress | None = None) -> list[float]:
    """Per part (layer 0 attn, layer 0 ffn, layer 1 attn, ...), how much the probe's KL grows when only that part
    of `graph` is removed (level 0, everything else at its database width): Puzzle's replace-one-block score, as a
    measured whole-model sensitivity of each part. The growth is over `graph`'s own KL (0 when `graph` is the
    probe's reference; gradual mode probes a pruned model against the dense one), and at least 0."""
    full = [(max(e.attn), max(e.ffn)) for e in db.layers]
    base = probe(graph)
    out = []
    for i, (a, f) in enumerate(full):
        for removed in ((0, f), (a, 0)):
            out.append(max(probe(realise(graph, db, full[:i] + [removed] + full[i + 1:])) - base, 0.0))
            if progress is not None:
                progress("ZipLM: removal KL per part", len(out), 2 * len(full))
    return out


def scale_to_removal(errors: list[list[float]], kl: list[float]) -> list[list[float]]:
    """Each part's error curve rescaled so its last level (the part removed) costs that part's removal KL:
    e * kl / e_removed. Any per-part normalisation cancels; a part whose removal error is 0 keeps zeros."""
    return [[e * k / es[-1] if es[-1] > 0 else 0.0 for e in es] for es, k in zip(errors, kl)]


def measure_latency(graph: ModelGraph, metric: str, batch: int, table) -> float:
    """ms of one decode step or one prefill, measured end to end with the table's settings and clock."""
    from llmcompress.hardware.profile import measure_model

    s = table.settings
    t = measure_model(graph, batch=batch, prompt_len=s.prompt_len, gen_len=min(s.gen_len, 64), repeats=3,
                      warmup=1, clock=s.clock, metrics=(metric,))
    return t[metric].median_ms


def measured_speedup(reference: ModelGraph, model: ModelGraph, metric: str, batch: int, table, rounds: int = 3
                     ) -> dict:
    """reference / model latency timed in back-to-back pairs (`hardware.profile.measure_speedup`) with the
    table's settings and clock. -> {"speedup", "reference_ms", "model_ms", "ratios", "rounds"}"""
    from llmcompress.hardware.profile import measure_speedup

    s = table.settings
    return measure_speedup(reference, model, metric, batch, s.prompt_len, min(s.gen_len, 64), rounds, s.clock)


def uniform_for_budget(db: Database, costs, errors, constant: float, budget: float) -> tuple[int, int]:
    """The uniform (KV groups, FFN channels), the same in every layer, whose predicted time meets the budget with
    the least summed database error (the baseline gets our error estimate to pick its width; its weights are
    chosen by activation magnitude, without updates)."""
    attn, ffn = db.levels("attn")[0], db.levels("ffn")[0]
    layers = len(db.layers)
    best = None
    for ai, a in enumerate(attn):
        for fi, f in enumerate(ffn):
            t = constant + sum(costs[2 * i][ai] + costs[2 * i + 1][fi] for i in range(layers))
            err = sum(errors[2 * i][ai] + errors[2 * i + 1][fi] for i in range(layers))
            if t <= budget and (best is None or err < best[0]):
                best = (err, a, f)
    if best is None:
        raise ValueError("no uniform width meets the budget")
    return best[1], best[2]


def prune_family(graph: ModelGraph, db: Database, cost_model, cfg: ZipLMConfig, tokens: torch.Tensor | None = None,
                 measure: bool = True, uniform: bool = False, progress: Progress | None = None,
                 reference: tuple[float, ModelGraph] | None = None) -> list[dict]:
    """One pruned model per target speed-up. -> [{speedup, model, predicted_speedup, measured_speedup, ...}]
    Measured speed-ups time the reference and each model in back-to-back pairs (`measured_speedup`).
    reference: (predicted ms, model) of the model the speed-ups refer to, when `graph` is not that model
    (gradual mode); by default `graph` itself."""
    costs, constant = part_costs(db, graph.config, cost_model, cfg.metric, cfg.batch)
    errors = part_errors(db, cfg.normalise)
    dense_pred, ref_graph = reference if reference is not None else (constant + sum(c[0] for c in costs), graph)

    def timed(model: ModelGraph) -> dict | None:
        return measured_speedup(ref_graph, model, cfg.metric, cfg.batch, cost_model.table, cfg.measure_rounds) \
            if measure else None
    probe, kl = None, None
    if cfg.error_scale == "removal_kl":
        if tokens is None:
            raise ValueError("error_scale removal_kl measures each part on calibration tokens: pass tokens, or set "
                             "error_scale none")
        with torch_threads(cfg.search_threads):  # the reference's log-probs once, shared with the search
            probe = KLProbe(ref_graph, tokens[:cfg.search_samples, :cfg.search_seq_len], cfg.search_positions,
                            cfg.batch_size)
            kl = removal_kl(graph, db, probe, progress)
        errors = scale_to_removal(errors, kl)
    dp = KnapsackDP(costs, errors, cfg.buckets)
    results = []
    for n, target in enumerate(cfg.speedups):
        budget = dense_pred / target
        search, target_dp = None, dp
        if cfg.search_steps and tokens is not None:
            with torch_threads(cfg.search_threads):
                if probe is None:  # the reference's log-probs once for all targets
                    probe = KLProbe(ref_graph, tokens[:cfg.search_samples, :cfg.search_seq_len],
                                    cfg.search_positions, cfg.batch_size)
                search = sensitivity_search(
                    costs, errors, budget - constant, lambda ch: probe(realise(graph, db, layer_choice(db, ch))),
                    cfg.search_steps, cfg.search_spread, cfg.search_mutate, cfg.search_seed, cfg.buckets, progress)
            # refinement rounds rescale the budget and keep the tuned weights
            target_dp = KnapsackDP(costs, weighted(errors, search["weights"]), cfg.buckets)
        rounds, tried = [], []
        for r in range(cfg.refine + 1 if measure else 1):
            sol = target_dp.solve(budget - constant)
            sol.error = sum(errors[p][o] for p, o in enumerate(sol.choice))  # the unweighted error
            choice = layer_choice(db, sol.choice)
            model = realise(graph, db, choice)  # latency does not depend on the weights: the quick realisation
            pred = dense_pred / (constant + sol.cost)
            timing = timed(model)
            meas = timing["speedup"] if timing is not None else None
            rounds.append({"budget_ms": budget, "predicted_speedup": pred, "measured_speedup": meas,
                           "error": sol.error, "timing": timing, "choice": choice})  # choice: to re-time it later
            tried.append(dict(budget=budget, sol=sol, choice=choice, model=model, pred=pred, timing=timing, meas=meas))
            if meas is None or abs(meas / target - 1) <= cfg.refine_tolerance or r == cfg.refine:
                break
            budget = budget * meas / target  # measured too slow -> tighter budget, and vice versa
        # keep the round measured closest to the target: a noisy timing can send a rescaled search further off
        # than the first solution was (seen: 1.382x for 1.25x, then 1.068x after rescaling)
        best = min(range(len(tried)), key=lambda i: abs(tried[i]["meas"] / target - 1) if tried[i]["meas"] else 0.0)
        kept = tried[best]
        budget, sol, choice, model = kept["budget"], kept["sol"], kept["choice"], kept["model"]
        pred, timing, meas = kept["pred"], kept["timing"], kept["meas"]
        for i, row in enumerate(rounds):
            row["kept"] = i == best
        if cfg.sequential and tokens is not None:
            model = realise(graph, db, choice, tokens, cfg.batch_size)
        row = {"target_speedup": target, "model": model, "choice": choice, "predicted_speedup": pred,
               "measured_speedup": meas, "predicted_ms": constant + sol.cost, "dense_predicted_ms": dense_pred,
               "dense_measured_ms": timing["reference_ms"] if timing else None, "error": sol.error, "params": count_params(model),
               "rounds": rounds}
        if kl is not None:
            row["removal_kl"] = kl
        if search is not None:
            row["search"] = {k: search[k] for k in ("start_loss", "loss", "evaluations", "accepted", "weights")} | {
                "steps": cfg.search_steps,
                "protocol": f"KL(dense || stitched model) on {min(cfg.search_samples, len(tokens))} calibration "
                            f"sequences of {min(cfg.search_seq_len, tokens.shape[1])} tokens, last "
                            f"{cfg.search_positions or 'all'} positions; database weights, before the sequential "
                            "realisation"}
        if uniform:
            a, f = uniform_for_budget(db, costs, errors, constant, budget)
            base = realise_uniform(graph, db, a, f)
            base_timing = timed(base)
            row["uniform"] = {"kv_groups": a, "ffn": f, "model": base, "params": count_params(base),
                              "measured_speedup": base_timing["speedup"] if base_timing else None,
                              "timing": base_timing}
        results.append(row)
        if progress is not None:
            progress("ZipLM: models for the targets", n + 1, len(cfg.speedups))
    return results


def prune_gradual(graph: ModelGraph, tokens: torch.Tensor, cost_model, cfg: ZipLMConfig, train: torch.Tensor,
                  folder=None, measure: bool = True, progress: Progress | None = None) -> list[dict]:
    """Gradual mode (module doc): targets in increasing order, each pruned from the previous target's distilled
    model. train: [N, S] distillation windows. folder: databases and distillation checkpoints (resumable).
    -> rows as `prune_family`'s, each with its "distillation" report"""
    from pathlib import Path

    from llmcompress.prune.database import build_database, default_levels
    from llmcompress.puzzle.gkd import GKDConfig, train_gkd

    folder = Path(folder) if folder is not None else None
    levels = default_levels(graph.config.intermediate_size, cfg.ffn_steps, cfg.ffn_multiple)
    gcfg = GKDConfig(tokens=cfg.gradual_tokens, batch_size=cfg.gradual_batch, lr=cfg.gradual_lr, cosine_weight=0.0,
                     mse_weight=1.0, kl_weight=1.0)
    current, reference, rows = graph, None, []
    for n, target in enumerate(cfg.speedups):
        sub = folder / f"gradual-{n}-{target:g}" if folder is not None else None
        # the first database is the dense model's, shared with the one-shot mode
        where = None if folder is None else (folder / "database" if n == 0 else sub / "database")
        db = build_database(current, tokens, levels, folder=where,
                            batch_size=cfg.batch_size, percdamp=cfg.percdamp, progress=progress)
        step = cfg.model_copy(update={"speedups": [target]})
        row = prune_family(current, db, cost_model, step, tokens, measure, progress=progress, reference=reference)[0]
        if reference is None:
            reference = (row["dense_predicted_ms"], graph)
        report = train_gkd(graph, row["model"], train, gcfg, folder=sub, progress=progress)
        row["distillation"] = {"steps": report["step"]} | {k: report[k] for k in ("tokens", "seconds", "protocol")} | {
            "loss_first": report["history"][0]["loss"] if report["history"] else None,
            "loss_last": report["history"][-1]["loss"] if report["history"] else None}
        row["params"] = count_params(row["model"])
        rows.append(row)
        current = row["model"]
    return rows


def profile_for(graph: ModelGraph, cfg: ZipLMConfig, clock: str = "wall", progress: Progress | None = None,
                **profile_kw):
    """A cost table of `graph` on its own device holding every FFN level of the search (no interpolation).
    profile_kw: further `profile` settings (prompt_len, gen_len, repeats, ...)."""
    from llmcompress.hardware.profile import profile
    from llmcompress.prune.database import default_levels

    size = graph.config.intermediate_size
    levels = [lv for lv in default_levels(size, cfg.ffn_steps, cfg.ffn_multiple) if lv > 0]
    c = graph.config
    rep = c.num_attention_heads // c.num_key_value_heads
    groups = [AttentionConfig(num_heads=rep * g, num_kv_heads=g) for g in range(1, c.num_key_value_heads + 1)]
    return profile(graph, batches=[cfg.batch], ffn_fractions=[lv / size for lv in levels], clock=clock,
                   progress=progress, extra_attention=groups, **profile_kw)


def run_ziplm(graph: ModelGraph, tokens: torch.Tensor, cfg: ZipLMConfig, table, out, measure: bool = True,
              uniform: bool = False, progress: Progress | None = None) -> tuple[list[dict], dict]:
    """Database in `out/database` (resumable), one deployable checkpoint per target in `out/speedup-<s>`.
    -> (rows with their models, JSON-ready report)"""
    from pathlib import Path

    from llmcompress.hardware.cost_model import CostModel
    from llmcompress.models import save
    from llmcompress.prune.database import build_database, default_levels

    out = Path(out)
    size = graph.config.intermediate_size
    if cfg.gradual:
        rows = prune_gradual(graph, tokens, CostModel(table), cfg, tokens, out, measure, progress)
    else:
        db = build_database(graph, tokens, default_levels(size, cfg.ffn_steps, cfg.ffn_multiple),
                            folder=out / "database", batch_size=cfg.batch_size, percdamp=cfg.percdamp,
                            progress=progress)
        rows = prune_family(graph, db, CostModel(table), cfg, tokens, measure, uniform, progress)
    tokenizer = getattr(graph, "tokenizer", None)
    report = {"device": table.device, "metric": cfg.metric, "batch": cfg.batch,
              "calibration": f"{len(tokens)} sequences of {tokens.shape[1]} tokens", "models": []}
    for row in rows:
        folder = out / f"speedup-{row['target_speedup']:g}"
        save(row["model"], folder, overwrite=True, tokenizer=tokenizer)
        entry = {k: v for k, v in row.items() if k not in ("model", "uniform")} | {"checkpoint": str(folder)}
        if "uniform" in row:
            entry["uniform"] = {k: v for k, v in row["uniform"].items() if k != "model"}
        report["models"].append(entry)
    return rows, report


__all__ = ["ZipLMConfig", "layer_choice", "measure_latency", "measured_speedup", "profile_for", "prune_family",
           "prune_gradual", "removal_kl", "run_ziplm", "scale_to_removal", "uniform_for_budget"]
