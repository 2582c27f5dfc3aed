"""Whole-layer pruning: drop the layers whose removal changes the next-token distribution least."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def without_layers(graph, skip: set[int]):
    """Temporarily run `graph` with layers `skip` removed (no copies, no weight changes)."""
    layers = graph.model.layers
    graph.model.layers = nn.ModuleList(l for i, l in enumerate(layers) if i not in skip)
    try:
        yield graph
    finally:
        graph.model.layers = layers


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over [B, S, V] logits -> scalar."""
    return kl_logp(F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1))


def kl_logp(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) from log-probabilities t, s: [B, S, V] -> scalar."""
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def layer_removal_kl(graph, tokens: torch.Tensor, batch_size: int = 4, removed: set[int] = frozenset(),
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """KL(model || model without layer i) for every layer i not in `removed`. tokens: [N, S] -> [L]"""
    n_layers = len(graph.model.layers)
    device = next(graph.parameters()).device
    scores = torch.full((n_layers,), float("inf"))
    candidates = [i for i in range(n_layers) if i not in removed]
    totals = torch.zeros(n_layers)
    batches = tokens.split(batch_size)
    done, total = 0, len(batches) * len(candidates)
    for batch in batches:
        batch = batch.to(device)
        with without_layers(graph, set(removed)):
            ref = graph(batch).logits
        for i in candidates:
            with without_layers(graph, set(removed) | {i}):
                totals[i] += kl_div(ref, graph(batch).logits).item() * len(batch)
            done += 1
            if progress:
                progress(done, total)
    scores[candidates] = totals[candidates] / len(tokens)
    return scores


def choose_layers(graph, tokens: torch.Tensor, num_layers: int, iterative: bool = False, batch_size: int = 4,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[int], list[float]]:
    """Pick `num_layers` layers to drop. One-shot: the lowest single-removal KL; iterative: greedily,
    rescoring after each removal. Returns (layers, the KL score of each layer at its pick)."""
    n_layers = len(graph.model.layers)
    if not 0 < num_layers < n_layers:
        raise ValueError(f"num_layers={num_layers} must be between 1 and {n_layers - 1} for a {n_layers}-layer model")
    if not iterative:
        scores = layer_removal_kl(graph, tokens, batch_size, progress=progress)
        order = torch.argsort(scores)[:num_layers].tolist()
        return sorted(order), [scores[i].item() for i in sorted(order)]
    removed: list[int] = []
    picked: list[float] = []
    for _ in range(num_layers):
        scores = layer_removal_kl(graph, tokens, batch_size, set(removed), progress)
        best = int(torch.argmin(scores))
        removed.append(best)
        picked.append(scores[best].item())
    order = sorted(range(len(removed)), key=lambda k: removed[k])
    return [removed[k] for k in order], [picked[k] for k in order]
