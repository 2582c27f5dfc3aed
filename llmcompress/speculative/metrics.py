"""Closed-form speculative-decoding metrics (Leviathan, Kalman & Matias 2023, section 3).

alpha: acceptance rate, E[sum_x min(p(x), q(x))] over the decoding's prefixes (p target, q draft).
gamma: draft tokens per target call.  c: cost of one draft step / cost of one target step.
All functions are pure and take plain floats; alpha = 1 is handled as the limit.
"""

from __future__ import annotations


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens produced per target call (block efficiency tau): (1 - a^(g+1)) / (1 - a)."""
    _check(alpha, gamma)
    if alpha == 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speedup(alpha: float, gamma: int, c: float) -> float:
    """Expected wall-time improvement over target-only decoding: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    if c < 0:
        raise ValueError(f"cost ratio c={c} must be >= 0")
    return expected_tokens(alpha, gamma) / (gamma * c + 1)


def operations_factor(alpha: float, gamma: int, c_ops: float) -> float:
    """Expected factor of extra arithmetic operations (Theorem 3.11): (1 - a)(g c_ops + g + 1) / (1 - a^(g+1)).

    c_ops: operations of one draft step / operations of one target step."""
    return (gamma * c_ops + gamma + 1) / expected_tokens(alpha, gamma)


def optimal_gamma(alpha: float, c: float, max_gamma: int = 64) -> int:
    """The integer gamma in [1, max_gamma] with the largest expected speed-up (ties: the smallest gamma)."""
    return max(range(1, max_gamma + 1), key=lambda g: (speedup(alpha, g, c), -g))


def alpha_from_tau(tau: float, gamma: int, tol: float = 1e-10) -> float:
    """Invert `expected_tokens`: the alpha that yields block efficiency `tau` at `gamma` (bisection)."""
    if not 1.0 <= tau <= gamma + 1:
        raise ValueError(f"tau={tau} must lie in [1, gamma + 1 = {gamma + 1}]")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, gamma) < tau else (lo, mid)
    return (lo + hi) / 2


def _check(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if gamma < 0 or int(gamma) != gamma:
        raise ValueError(f"gamma={gamma} must be a non-negative integer")


__all__ = ["alpha_from_tau", "expected_tokens", "operations_factor", "optimal_gamma", "speedup"]
