"""Puzzle stages: `puzzle_library`, `puzzle_bld`, `puzzle_score`, `puzzle_mip` (artefacts only) and `gkd`
(assembles the chosen blocks and distils; the model it returns is the compressed one).

All of them share a work folder (`workdir`, relative to the working directory; give every Puzzle stage of
a recipe the same one):
  library/                 variants and FFN channel ranking          (puzzle_library)
  bld/blocks/*.safetensors one checkpoint per trained block          (puzzle_bld; an interrupted run resumes)
  bld/activations/         parent activations, when they go to disk  (puzzle_bld)
  costs-<key>.json         the cost table, when profiled here        (puzzle_score)
  library-scored.json      scores and costs of every block           (puzzle_score)
  solutions.json           MIP solutions and baselines               (puzzle_mip)
  gkd/checkpoint-<key>/    GKD training state                        (gkd; an interrupted run resumes)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from llmcompress.hardware import load_table, profile, save_table
from llmcompress.puzzle.bld import BLDConfig, run_bld
from llmcompress.puzzle.context import search_in_context
from llmcompress.puzzle.gkd import GKDConfig, assemble, train_gkd
from llmcompress.puzzle.library import BlockLibrary, LibraryConfig, build_library, variant_name
from llmcompress.puzzle.mip import Budgets, search, table_bias
from llmcompress.puzzle.score import ScoreConfig, block_of, load_library, save_library, score_blocks, scored_library
from llmcompress.stages.base import Stage, StageContext

SCORED = "library-scored.json"
SOLUTIONS = "solutions.json"


class _PuzzleStage(Stage):
    changes_model: ClassVar[bool] = False
    workdir: str = Field("puzzle", description="folder of the Puzzle artefacts, shared by all Puzzle stages")

    @property
    def folder(self) -> Path:
        return Path(self.workdir).expanduser()

    def config_of(self, cls):
        return cls(**self.model_dump(include=set(cls.model_fields)))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _windows(ctx: StageContext, skip: int, num: int):
    """Training windows skip..skip+num of the data section's seeded order. -> [num, seq_len]"""
    tokens = ctx.corpus.train_batches(skip + num)
    if len(tokens) < skip + num:
        raise ValueError(f"the data gives {len(tokens)} windows of {ctx.corpus.cfg.seq_len} tokens, {skip + num} "
                         "are needed; use more data, a shorter data.seq_len or fewer samples")
    return tokens[skip:]


class PuzzleLibraryStage(_PuzzleStage, LibraryConfig):
    type: Literal["puzzle_library"] = "puzzle_library"

    def run(self, graph, ctx: StageContext):
        lib = build_library(graph, _windows(ctx, 0, self.num_samples), self.config_of(LibraryConfig),
                            progress=ctx.progress)
        lib.save(self.folder / "library")
        return graph, {"attention": [variant_name(a) for a in lib.attention], "ffn": [variant_name(f) for f in lib.ffn],
                       "layers": lib.num_layers, "folder": str(self.folder / "library")}


class PuzzleBLDStage(_PuzzleStage, BLDConfig):
    type: Literal["puzzle_bld"] = "puzzle_bld"

    def run(self, graph, ctx: StageContext):
        lib = BlockLibrary.load(self.folder / "library")
        report = run_bld(graph, lib, _windows(ctx, 0, self.num_samples), self.config_of(BLDConfig),
                         self.folder / "bld", progress=ctx.progress)
        return graph, report


class PuzzleScoreStage(_PuzzleStage, ScoreConfig):
    type: Literal["puzzle_score"] = "puzzle_score"
    skip_samples: int = Field(64, ge=0, description="windows used by BLD, skipped so scoring tokens are held out "
                              "(at least puzzle_bld's num_samples)")
    cost_table: str | None = Field(None, description="a profiled cost table (llmcompress profile); by default the "
                                   "current device is profiled with the settings below and cached in workdir")
    profile_batches: list[int] = Field([1], description="batch sizes to profile")
    prompt_len: int = Field(512, gt=0, description="profiled prompt length (prefill)")
    gen_len: int = Field(128, gt=0, description="profiled generation length (decode context)")
    profile_repeats: int = Field(5, gt=0)

    def costs(self, graph, lib: BlockLibrary, ctx: StageContext):
        if self.cost_table is not None:
            return load_table(ctx.base_dir / self.cost_table if not Path(self.cost_table).exists() else self.cost_table)
        parent = lib.parent.ffn.intermediate_size
        fractions = sorted({1.0} | {f.intermediate_size / parent for f in lib.ffn if f.kind == "mlp"}, reverse=True)
        settings = [self.profile_batches, self.prompt_len, self.gen_len, fractions, self.profile_repeats,
                    str(next(graph.parameters()).device), str(next(graph.parameters()).dtype)]
        path = self.folder / f"costs-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}.json"
        if path.exists():
            return load_table(path)
        table = profile(graph, self.profile_batches, self.prompt_len, self.gen_len, fractions,
                        repeats=self.profile_repeats, model_name=str(getattr(graph, "source", "")),
                        progress=ctx.progress)
        save_table(table, path, overwrite=True)
        return table

    def run(self, graph, ctx: StageContext):
        lib = BlockLibrary.load(self.folder / "library")
        table = self.costs(graph, lib, ctx)
        tokens = _windows(ctx, self.skip_samples, self.num_samples)
        scores = score_blocks(graph, lib, tokens, self.config_of(ScoreConfig), self.folder / "bld",
                              progress=ctx.progress)
        scored = scored_library(lib, scores, table)
        save_library(scored, self.folder / SCORED)
        untrained = sum(not t for part in scores["trained"].values() for layer in part for t in layer)
        return graph, {"library": str(self.folder / SCORED), "protocol": scores["protocol"],
                       "cost_table": scored["cost_table"], "untrained_variants": untrained,
                       "scores": {part: {variant_name(v): [row[k] for row in scores[part]]
                                         for k, v in enumerate(lib.variants(part))} for part in ("attention", "ffn")}}


class PuzzleMIPStage(_PuzzleStage, Budgets):
    type: Literal["puzzle_mip"] = "puzzle_mip"
    backend: Literal["ortools", "pulp"] = "ortools"
    num_solutions: int = Field(1, gt=0, description="diverse solutions to return (the first is the best)")
    max_shared: float = Field(0.8, ge=0, le=1, description="a further solution shares at most this fraction of "
                              "layers' blocks with each earlier one")
    time_limit_s: float = Field(60.0, gt=0)
    refine: int = Field(0, ge=0, description="target_speedup only: rounds of assembling the best solution, timing "
                        "it against the parent on this device and searching again with the target divided by the "
                        "table's bias (measured / predicted, geometric mean over the rounds so far): the table "
                        "misses what only the whole model shows. Stops early once a round is within "
                        "refine_tolerance; otherwise the last search is kept untimed (the final eval times it)")
    refine_tolerance: float = Field(0.03, ge=0, description="stop refining when measured is this close (relative)")
    measure_rounds: int = Field(3, gt=0, description="alternating parent/model timing rounds per measurement")
    context_rounds: int = Field(0, ge=0, description="rounds of in-context search after the search (and "
                                "refinement): score every variant swapped into the best solution, solve the MIP "
                                "over those scores within each trust region and keep the candidate with the lowest "
                                "whole-model KL if it beats the best solution's (puzzle/context.py)")
    context_skip_samples: int = Field(64, ge=0, description="windows skipped before the in-context scoring "
                                      "windows (at least puzzle_bld's num_samples, so they are held out)")
    context_num_samples: int = Field(4, gt=0, description="calibration windows of the in-context scores")
    context_positions: int | None = Field(64, gt=0, description="score the last N positions of each window")
    context_max_changed: list[Annotated[int, Field(gt=0)]] = Field(
        [1, 2, 3, 4, 6, 8], min_length=1, description="trust regions: per round, one candidate changing at most k "
        "layers for each k")

    def run(self, graph, ctx: StageContext):
        lib = load_library(self.folder / SCORED)
        budgets = self.config_of(Budgets)
        result = search(lib, budgets, self.backend, self.num_solutions, self.max_shared, self.time_limit_s)
        if self.refine and budgets.target_speedup is not None:
            result = self._refine(graph, lib, budgets, result, ctx)
            budgets = budgets.model_copy(update={"target_speedup": result["searched_speedup"]})
        if self.context_rounds:
            result = self._in_context(graph, lib, budgets, result, ctx)
        _write_json(self.folder / SOLUTIONS, result)
        return graph, result

    def _in_context(self, graph, lib: dict, budgets: Budgets, result: dict, ctx: StageContext) -> dict:
        """search_in_context around the best solution. A solution it keeps is not timed here (the refinement's
        measurement was of the model before it): the eval stage times the final model."""
        cfg = ScoreConfig(num_samples=self.context_num_samples, positions=self.context_positions)
        result, _ = search_in_context(
            graph, BlockLibrary.load(self.folder / "library"), lib, budgets, result,
            _windows(ctx, self.context_skip_samples, self.context_num_samples), cfg, self.folder / "bld",
            self.context_rounds, self.context_max_changed, self.backend, self.time_limit_s, ctx.progress)
        if "measured_speedup" in result and any(r["kept"] is not None for r in result["context"]["rounds"]):
            result["measured_speedup_before_context"] = result.pop("measured_speedup")
        return result

    def _refine(self, graph, lib: dict, budgets: Budgets, result: dict, ctx: StageContext) -> dict:
        """Time the best solution against the parent and search again with the target divided by the table's
        bias, the geometric mean of measured / predicted over every round so far (one noisy round on a shared
        machine must not swing the next search), for up to `refine` rounds or until a measurement is within
        refine_tolerance of the target. If the last round is still off, its search at the pooled estimate is kept,
        untimed here."""
        from llmcompress.hardware import measure_speedup

        library, ct, target = BlockLibrary.load(self.folder / "library"), lib["cost_table"], budgets.target_speedup
        rounds = []
        for r in range(self.refine):
            ctx.progress("puzzle_mip: measuring the best solution", r, self.refine)
            best = result["solutions"][0]
            predicted = best["predicted_speedup"][budgets.speedup_metric]
            model, _ = assemble(graph, library, [block_of(lib, n) for n in best["blocks"]], self.folder / "bld")
            m = measure_speedup(graph, model, budgets.speedup_metric, batch=budgets.latency_batch,
                                prompt_len=ct["prompt_len"], gen_len=ct["gen_len"], rounds=self.measure_rounds)
            del model
            rounds.append({"requested_speedup": budgets.target_speedup, "predicted_speedup": predicted,
                           "measured_speedup": m["speedup"], "timing": m})
            rounds[-1]["correction"] = table_bias([x["predicted_speedup"] for x in rounds],
                                                  [x["measured_speedup"] for x in rounds])
            done = abs(m["speedup"] / target - 1) <= self.refine_tolerance
            if done:
                break
            budgets = budgets.model_copy(update={"target_speedup": target / rounds[-1]["correction"]})
            result = search(lib, budgets, self.backend, self.num_solutions, self.max_shared, self.time_limit_s)
        return result | {"target_speedup": target, "refinement": rounds,
                         "searched_speedup": budgets.target_speedup,
                         "measured_speedup": rounds[-1]["measured_speedup"] if done else None}


class GKDStage(_PuzzleStage, GKDConfig):
    type: Literal["gkd"] = "gkd"
    changes_model: ClassVar[bool] = True
    solution: int = Field(0, ge=0, description="which puzzle_mip solution to realise (0: the best)")

    def run(self, graph, ctx: StageContext):
        path = self.folder / SOLUTIONS
        if not path.exists():
            raise ValueError(f"{path} does not exist; run the puzzle_mip stage first (or rerun with --from puzzle_mip)")
        sols = json.loads(path.read_text())["solutions"]
        if self.solution >= len(sols):
            raise ValueError(f"solution {self.solution} asked, puzzle_mip found {len(sols)}; pick 0..{len(sols) - 1}")
        lib = load_library(self.folder / SCORED)
        chosen = sols[self.solution]
        student, rows = assemble(graph, BlockLibrary.load(self.folder / "library"),
                                 [block_of(lib, n) for n in chosen["blocks"]], self.folder / "bld")
        tokens = _windows(ctx, 0, self.num_samples)
        report = train_gkd(graph, student, tokens, self.config_of(GKDConfig), self.folder / "gkd", ctx.progress)
        history = report.pop("history")
        report |= {"layers": rows, "predicted": chosen["predicted"], "predicted_speedup": chosen["predicted_speedup"],
                   "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None}
        return student, report


PUZZLE_STAGES = (PuzzleLibraryStage, PuzzleBLDStage, PuzzleScoreStage, PuzzleMIPStage, GKDStage)


def search_recipe(model: str, data: str, output: str, target_speedup: float, device: str = "cpu",
                  dtype: str = "float32", metric: str = "decode", cost_table: str | None = None,
                  bld_tokens: int = 8192, gkd_tokens: int = 65536, seq_len: int = 256, heldout_rows: int = 200,
                  prompt_len: int = 512, gen_len: int = 128, evaluate: bool = True) -> dict:
    """The recipe (as a dict) that `llmcompress search --method puzzle` runs: the whole Puzzle path, then eval."""
    work = str(Path(output) / "puzzle")
    stages = [
        {"type": "puzzle_library", "workdir": work},
        {"type": "puzzle_bld", "workdir": work, "tokens": bld_tokens},
        {"type": "puzzle_score", "workdir": work, "cost_table": cost_table, "positions": min(64, seq_len),
         "prompt_len": prompt_len, "gen_len": gen_len},
        {"type": "puzzle_mip", "workdir": work, "target_speedup": target_speedup, "speedup_metric": metric,
         "context_rounds": 1, "context_positions": min(64, seq_len)},
        {"type": "gkd", "workdir": work, "tokens": gkd_tokens},
    ]
    if evaluate:
        stages.append({"type": "eval", "name": "eval_puzzle", "ppl_seq_len": seq_len, "prefill_len": prompt_len})
    return {"model": model, "output": output, "dtype": dtype, "device": device,
            "data": {"source": data, "heldout_rows": heldout_rows, "seq_len": seq_len}, "stages": stages}
