"""Wanda (Sun et al. 2023): prune by |W| times the input's column norm, per output row. No weight update."""

from __future__ import annotations

import torch

from llmcompress.oneshot.magnitude import Pattern, keep_mask


def wanda_prune(W: torch.Tensor, sqnorm: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [N, K], sqnorm: [K] (sum over calibration tokens of x_j²) -> (pruned W, keep [N, K])."""
    score = W.abs().float() * sqnorm.float().sqrt()[None, :]
    keep = keep_mask(score, pattern, per_row=True)
    return W * keep, keep
