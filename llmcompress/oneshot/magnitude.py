"""Sparsity patterns, keep-masks from scores, and magnitude pruning.

A pattern is "n:m" (keep n of every m consecutive weights along the input axis: "2:4", "4:8") or a
ratio "0.5" (unstructured: that fraction of the weights is pruned).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Pattern(NamedTuple):
    sparsity: float  # fraction pruned
    n: int = 0  # keep n of every m; 0: unstructured
    m: int = 0

    @property
    def is_24(self) -> bool:
        return (self.n, self.m) == (2, 4)


def parse_pattern(text: str) -> Pattern:
    """'2:4' -> Pattern(0.5, 2, 4); '0.6' -> Pattern(0.6)."""
    text = str(text).strip()
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"sparsity pattern {text!r} is not n:m with 0 < n < m (keep n of every m), e.g. 2:4 or 4:8")
        return Pattern(1 - int(n) / int(m), int(n), int(m))
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"sparsity pattern {text!r} is neither n:m (e.g. 2:4) nor a ratio (e.g. 0.5)") from None
    if not 0 < ratio < 1:
        raise ValueError(f"sparsity ratio {ratio} must lie strictly between 0 and 1 (the fraction pruned)")
    return Pattern(ratio)


def check_pattern(name: str, k: int, pattern: Pattern) -> None:
    if pattern.m and k % pattern.m:
        raise ValueError(f"{name}: input width {k} is not a multiple of {pattern.m}; "
                         f"{pattern.n}:{pattern.m} needs whole groups of {pattern.m}")


def keep_mask(score: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """score: [N, K] (higher = more important) -> keep: bool [N, K].

    n:m keeps the n best of each group of m; a ratio prunes the lowest scores of each row (per_row)
    or of the whole matrix.
    """
    N, K = score.shape
    if pattern.m:
        groups = score.reshape(N, K // pattern.m, pattern.m)
        idx = groups.topk(pattern.n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(N, K)
    flat = score if per_row else score.reshape(1, -1)
    idx = flat.topk(int(flat.shape[1] * pattern.sparsity), dim=1, largest=False).indices
    return torch.ones_like(flat, dtype=torch.bool).scatter_(1, idx, False).reshape(N, K)


def magnitude_prune(W: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [N, K] -> (pruned W, keep [N, K]); ratios use one threshold for the whole layer."""
    keep = keep_mask(W.abs().float(), pattern, per_row=False)
    return W * keep, keep
