"""In-context search: the MIP again around its own solution, with block scores measured in that solution.

Replace-1-block scores are measured around the parent, so the MIP's objective (their sum) misses how blocks
interact once many layers are compressed. Starting from a solution, every variant is swapped into it alone
(score.score_in_context) and the MIP is solved over those changes (the current blocks score 0) under the same
budgets, within a trust region: at most k layers may change, for each k of a list (the changes only add up
near the current model; unbounded, the MIP changes most layers and the model gets far worse). Each distinct
candidate is assembled and the one with the lowest whole-model KL from the parent (score.model_score, on the
same calibration windows) is kept if it beats the current model. Rounds stop at the first that keeps nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from llmcompress.models.graph import ModelGraph
from llmcompress.puzzle.gkd import assemble
from llmcompress.puzzle.library import BlockLibrary
from llmcompress.puzzle.mip import Backend, Budgets, search
from llmcompress.puzzle.score import ScoreConfig, block_of, context_matrix, model_score, score_in_context

Progress = Callable[[str, int, int], None]


def search_in_context(parent: ModelGraph, library: BlockLibrary, lib: dict, budgets: Budgets, result: dict,
                      tokens: torch.Tensor, cfg: ScoreConfig, bld_folder: str | Path | None, rounds: int,
                      max_changed: Sequence[int] = (1, 2, 3, 4, 6, 8), backend: Backend = "ortools",
                      time_limit_s: float = 60.0, progress: Progress | None = None) -> tuple[dict, ModelGraph]:
    """Up to `rounds` in-context searches from result["solutions"][0] (a `mip.search` result on lib).
    tokens: [N, S] calibration windows held out from BLD. -> (result, with solutions = [the kept one] when a
    round kept one, and result["context"] = {"protocol", "rounds": [{"round", "kl", "candidates": [{"max_changed",
    "changed_layers", "objective", "kl"}], "kept"}]}; the kept solution's assembled model)"""
    if rounds < 1 or not max_changed or min(max_changed) < 1:
        raise ValueError(f"rounds and every max_changed must be >= 1, got {rounds}, {list(max_changed)}")
    best = result["solutions"][0]
    model, _ = assemble(parent, library, [block_of(lib, n) for n in best["blocks"]], bld_folder)
    history, protocol = [], ""
    for r in range(rounds):
        scores = score_in_context(parent, model, library, [block_of(lib, n) for n in best["blocks"]], tokens, cfg,
                                  bld_folder, progress=progress)
        protocol, objective = scores["protocol"], context_matrix(lib, scores)
        row, seen, kept = {"round": r, "kl": scores["base"], "candidates": [], "kept": None}, set(), None
        for k in sorted(set(max_changed)):
            cand = search(lib, budgets, backend, 1, 1.0, time_limit_s, objective=objective, near=best["blocks"],
                          max_changed=k)["solutions"][0]
            key = tuple(cand["blocks"])
            if key in seen or cand["blocks"] == best["blocks"]:
                continue
            seen.add(key)
            graph, _ = assemble(parent, library, [block_of(lib, n) for n in cand["blocks"]], bld_folder)
            entry = {"max_changed": k, "changed_layers": sum(a != b for a, b in zip(cand["blocks"], best["blocks"])),
                     "objective": cand["objective"], "kl": model_score(parent, graph, tokens, cfg)}
            row["candidates"].append(entry)
            if entry["kl"] < (kept[0]["kl"] if kept else row["kl"]):
                kept = (entry, cand, graph)
            else:
                del graph
        history.append(row)
        if kept is None:
            break
        row["kept"] = kept[0]["max_changed"]
        result, best, model = result | {"solutions": [kept[1]]}, kept[1], kept[2]
    return result | {"context": {"protocol": protocol, "rounds": history}}, model
