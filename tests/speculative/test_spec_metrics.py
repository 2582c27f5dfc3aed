"""Leviathan et al.'s closed forms.

The paper's own tables (Table 4 and the figures) could not be retrieved here, so the expected values are
worked out by hand from the formulas of section 3, plus the paper's closed-form corollary for gamma = 1:
speed-up (1 + alpha) / (1 + c), and the limits alpha -> 0 (one token per call) and alpha -> 1 (gamma + 1).
"""

import pytest

from llmcompress.speculative import metrics as m


@pytest.mark.parametrize("alpha,gamma,tau", [
    (0.8, 4, 3.3616),            # (1 - 0.8^5) / 0.2 = 0.67232 / 0.2
    (0.5, 1, 1.5),               # 1 + alpha
    (0.5, 3, 1.875),             # (1 - 1/16) / 0.5
    (0.75, 7, 3.59954833984375), # (1 - 0.75^8) / 0.25 = 0.89988708 / 0.25
    (0.0, 5, 1.0),
    (1.0, 5, 6.0),
])
def test_expected_tokens(alpha, gamma, tau):
    assert m.expected_tokens(alpha, gamma) == pytest.approx(tau, abs=1e-9)


@pytest.mark.parametrize("alpha,gamma,c,s", [
    (0.8, 4, 0.1, 2.4011428571),   # 3.3616 / 1.4
    (0.8, 6, 0.1, 2.4696400000),   # (1 - 0.8^7) / 0.2 / 1.6 = 3.951424 / 1.6
    (0.6, 4, 0.05, 1.9213333333),  # (1 - 0.6^5) / 0.4 / 1.2 = 2.3056 / 1.2
    (0.5, 2, 0.3, 1.09375),        # 1.75 / 1.6
])
def test_speedup(alpha, gamma, c, s):
    assert m.speedup(alpha, gamma, c) == pytest.approx(s, abs=1e-9)


@pytest.mark.parametrize("alpha,c", [(0.3, 0.1), (0.7, 0.02), (0.9, 0.5)])
def test_gamma_one_corollary(alpha, c):
    assert m.speedup(alpha, 1, c) == pytest.approx((1 + alpha) / (1 + c))
    # Corollary 3.9: alpha > c -> some gamma speeds decoding up; alpha < c -> none does (1 + ... + a^g < 1 + g c)
    best = max(m.speedup(alpha, g, c) for g in range(1, 65))
    assert (best > 1) == (alpha > c)


@pytest.mark.parametrize("alpha,c,best", [(0.8, 0.1, 6), (0.6, 0.05, 4), (0.5, 0.3, 1)])
def test_optimal_gamma(alpha, c, best):
    assert m.optimal_gamma(alpha, c) == best


def test_operations_and_inverse():
    # gamma = 2, alpha = 0.5, c_ops = 0.1: (2 * 0.1 + 3) / 1.75
    assert m.operations_factor(0.5, 2, 0.1) == pytest.approx(3.2 / 1.75)
    for alpha in (0.1, 0.55, 0.93):
        assert m.alpha_from_tau(m.expected_tokens(alpha, 4), 4) == pytest.approx(alpha, abs=1e-8)
    with pytest.raises(ValueError, match="alpha"):
        m.expected_tokens(1.2, 2)
    with pytest.raises(ValueError, match="tau"):
        m.alpha_from_tau(5.0, 3)
