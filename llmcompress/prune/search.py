"""Choose one option per part (e.g. a pruning level per layer half) minimising summed error under a cost budget.

Dynamic programming over discretised cost, as in SPDY: costs are rounded UP to multiples of `unit`, so every
solution meets the real budget, and the optimum is exact for the rounded costs (within parts * unit of the
exact optimum's cost). One table answers every budget at once: a family of targets costs one DP.
Pure numpy-free torch code: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Solution:
    choice: list[int]  # option index per part
    cost: float  # summed (unrounded) cost of the choice
    error: float  # summed error


class KnapsackDP:
    """min Σ error[p][o_p] s.t. Σ cost[p][o_p] <= budget, one option o_p per part.

    costs, errors: per part, a list of option costs (>= 0) and errors. buckets: resolution of the cost axis
    (max total cost / buckets per step)."""

    def __init__(self, costs: list[list[float]], errors: list[list[float]], buckets: int = 20000):
        if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
            raise ValueError("costs and errors need the same non-empty option list per part")
        if any(c < 0 for cs in costs for c in cs):
            raise ValueError("option costs must be >= 0")
        self.costs, self.errors = costs, errors
        total = sum(max(c) for c in costs)
        self.unit = max(total, 1e-12) / buckets
        self.size = buckets + len(costs) + 1  # room for the rounding up of every part
        inf = float("inf")
        dp = torch.full((self.size,), inf, dtype=torch.float64)
        dp[0] = 0.0
        self.back = []  # per part: [size] option chosen at each exact integer cost
        for cs, es in zip(costs, errors):
            new = torch.full_like(dp, inf)
            arg = torch.full((self.size,), -1, dtype=torch.int32)
            for o, (c, e) in enumerate(zip(cs, es)):
                k = int(-(-c // self.unit)) if c > 0 else 0
                if k >= self.size:
                    continue
                cand = torch.full_like(dp, inf)
                cand[k:] = dp[: self.size - k] + e
                better = cand < new
                new = torch.where(better, cand, new)
                arg = torch.where(better, torch.tensor(o, dtype=torch.int32), arg)
            dp = new
            self.back.append(arg)
        self.dp = dp

    def solve(self, budget: float) -> Solution:
        """The best choice with summed cost <= budget; ValueError naming the cheapest cost when infeasible."""
        b = min(int(budget // self.unit), self.size - 1)
        cheapest = sum(min(c) for c in self.costs)
        if b < 0 or not torch.isfinite(self.dp[: b + 1]).any():
            raise ValueError(f"no choice costs at most {budget:.4g}; the cheapest costs {cheapest:.4g}")
        k = int(torch.argmin(self.dp[: b + 1]))
        choice = []
        for p in range(len(self.costs) - 1, -1, -1):
            o = int(self.back[p][k])
            choice.append(o)
            c = self.costs[p][o]
            k -= int(-(-c // self.unit)) if c > 0 else 0
        choice.reverse()
        return Solution(choice=choice, cost=sum(self.costs[p][o] for p, o in enumerate(choice)),
                        error=sum(self.errors[p][o] for p, o in enumerate(choice)))


def brute_force(costs: list[list[float]], errors: list[list[float]], budget: float) -> Solution | None:
    """Exhaustive reference for tests (small instances only)."""
    import itertools

    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[p][o] for p, o in enumerate(choice))
        err = sum(errors[p][o] for p, o in enumerate(choice))
        if cost <= budget and (best is None or err < best.error):
            best = Solution(list(choice), cost, err)
    return best


__all__ = ["KnapsackDP", "Solution", "brute_force"]
