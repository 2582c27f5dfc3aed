"""Sensitivity search over the DP's per-part error weights (SPDY's reparametrised search, as ZipLM uses it).

The DP minimises a sum of per-layer OBS errors. Those errors are layer-local: an error in an early layer and the
same error in a late one hurt the model differently. The search injects that global information: every part p
(attention or FFN of a layer) gets a weight w_p, the DP minimises Σ_p w_p · error_p(level) under the same cost
budget, and the weights are tuned by a randomised local search whose objective is the stitched model's real
calibration loss (KL of its next-token distributions to the dense model's).

Our variant of SPDY: the weights multiply the (normalised) OBS errors instead of replacing them with a fixed
prior, and the search starts from w = 1, the plain DP's choice, so its result never has a higher calibration loss
than the plain DP's. Each step resamples the log-weights of a few parts (their number shrinks over the steps),
solves the DP and keeps the new weights when the loss is not higher. Choices already evaluated come from a cache.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from llmcompress.prune.layers import kl_logp
from llmcompress.prune.search import KnapsackDP

Progress = Callable[[str, int, int], None]


def weighted(errors: list[list[float]], weights: list[float]) -> list[list[float]]:
    """Per-part errors scaled by their weights."""
    return [[w * e for e in es] for w, es in zip(weights, errors)]


def sensitivity_search(costs: list[list[float]], errors: list[list[float]], budget: float,
                       evaluate: Callable[[list[int]], float], steps: int = 100, spread: float = 2.0,
                       mutate: float = 0.1, seed: int = 0, buckets: int = 20000,
                       progress: Progress | None = None) -> dict:
    """Tune per-part error weights so the DP's choice under `budget` has the lowest `evaluate` loss.

    costs, errors: per part, per option (as `KnapsackDP`). evaluate: option index per part -> loss (lower is
    better). spread: a resampled log-weight is uniform in [-log spread, log spread] around 0. mutate: the largest
    fraction of parts resampled in one step (at least one; the number shrinks linearly to one over the steps).
    -> {"weights", "choice", "loss", "start_loss", "evaluations", "accepted", "history": [[step, loss]]}"""
    if steps < 0 or spread < 1 or not 0 < mutate <= 1:
        raise ValueError("steps >= 0, spread >= 1 and 0 < mutate <= 1 are required")
    parts = len(costs)
    gen = torch.Generator().manual_seed(seed)
    cache: dict[tuple[int, ...], float] = {}

    def loss_of(choice: list[int]) -> float:
        key = tuple(choice)
        if key not in cache:
            cache[key] = float(evaluate(choice))
        return cache[key]

    # the cost axis (and so every choice's feasibility) is the same for all weights: one rounding unit
    weights = [1.0] * parts
    choice = KnapsackDP(costs, errors, buckets).solve(budget).choice
    loss = start = loss_of(choice)
    history, accepted = [[0, loss]], 0
    most = max(1, round(mutate * parts))
    for step in range(1, steps + 1):
        n = max(1, round(most - (most - 1) * (step - 1) / max(1, steps - 1)))
        picked = torch.randperm(parts, generator=gen)[:n].tolist()
        logs = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(spread)
        trial = list(weights)
        for p, lw in zip(picked, logs.tolist()):
            trial[p] = math.exp(lw)
        cand = KnapsackDP(costs, weighted(errors, trial), buckets).solve(budget).choice
        cand_loss = loss_of(cand)
        if cand_loss <= loss:  # ties move the weights on: a wider walk over the same choice
            accepted += cand_loss < loss
            weights, choice, loss = trial, cand, cand_loss
        history.append([step, loss])
        if progress is not None:
            progress("ZipLM: sensitivity search", step, steps)
    return {"weights": weights, "choice": choice, "loss": loss, "start_loss": start, "evaluations": len(cache),
            "accepted": accepted, "history": history}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with n intra-op threads (0: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class KLProbe:
    """Calibration loss of a model against a reference: mean KL(reference || model) of next-token distributions
    at the last `positions` of each sequence. The reference's log-probabilities are computed once.

    tokens: [N, S] ids. positions: scored positions per sequence (0: all)."""

    @torch.no_grad()
    def __init__(self, reference, tokens: torch.Tensor, positions: int = 128, batch_size: int = 4):
        if positions < 0 or batch_size < 1:
            raise ValueError("positions >= 0 and batch_size >= 1 are required")
        device = next(reference.parameters()).device
        self.batches = [b.to(device) for b in tokens.split(batch_size)]
        self.positions = positions
        self.refs = [F.log_softmax(self._logits(reference, ids).float(), -1) for ids in self.batches]

    def _logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(ids, logits_to_keep=self.positions).logits  # [B, positions or S, V]

    @torch.no_grad()
    def __call__(self, model) -> float:
        total = sum(kl_logp(ref, F.log_softmax(self._logits(model, ids).float(), -1)).item() * len(ids)
                    for ids, ref in zip(self.batches, self.refs))
        return total / sum(len(ids) for ids in self.batches)


__all__ = ["KLProbe", "sensitivity_search", "torch_threads", "weighted"]
