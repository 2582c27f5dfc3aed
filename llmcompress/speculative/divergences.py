"""Token-level divergences between the target's distribution p and the draft's q (DistillSpec, section 4).

Every function takes logits [..., V] of the target and of the draft, divides both by the sampling
`temperature` (the distributions speculative decoding will compare), and returns one value per token
[...]. `masked_mean` averages them over the positions a mask keeps (the generated tokens, not the prompt).

Conventions:
- fkl = KL(p || q) (mode covering), rkl = KL(q || p) (mode seeking).
- jsd(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (Agarwal et al.'s
  generalised JSD, used by DistillSpec). Taken literally both ends are 0 (m equals the one distribution
  that carries weight), so, as in GKD/DistillSpec, the ends are defined by their limits:
  jsd(beta)/beta -> KL(p || q) as beta -> 0 and jsd(beta)/(1 - beta) -> KL(q || p) as beta -> 1;
  jsd:0 IS fkl and jsd:1 IS rkl, computed exactly (no tiny-beta approximation).
- tvd = 1/2 sum |p - q|.  accept = 1 - sum min(p, q), the probability that speculative sampling
  rejects the draft's token. The two are equal for any p, q (sum p = sum q = 1), value and gradient;
  `accept` is computed through min so the name says what is optimised.
No T^2 factor: the loss compares the very distributions sampled at `temperature`.
"""

from __future__ import annotations

import math

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator

KINDS = ("fkl", "rkl", "jsd", "tvd", "accept")


def _log_probs(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float):
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy decoding: train at temperature 1)")
    dtype = torch.promote_types(torch.promote_types(target_logits.dtype, draft_logits.dtype), torch.float32)
    logp = F.log_softmax(target_logits.to(dtype) / temperature, -1)  # [..., V], float32 or float64
    logq = F.log_softmax(draft_logits.to(dtype) / temperature, -1)
    return logp, logq


def _kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities (0 log 0 = 0). [..., V] -> [...]"""
    a = loga.exp()
    return torch.where(a > 0, a * (loga - logb), torch.zeros_like(a)).sum(-1)


def forward_kl(target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    logp, logq = _log_probs(target_logits, draft_logits, temperature)
    return _kl(logp, logq)


def reverse_kl(target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    logp, logq = _log_probs(target_logits, draft_logits, temperature)
    return _kl(logq, logp)


def jsd(target_logits, draft_logits, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalised JSD(beta); beta = 0 is KL(p || q) and beta = 1 is KL(q || p) exactly (see module doc)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta} must lie in [0, 1]")
    logp, logq = _log_probs(target_logits, draft_logits, temperature)
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))  # log(beta p + (1 - beta) q)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def total_variation(target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    logp, logq = _log_probs(target_logits, draft_logits, temperature)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def acceptance_loss(target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    """1 - sum_x min(p(x), q(x)): one minus the chance that the draft's token is accepted."""
    logp, logq = _log_probs(target_logits, draft_logits, temperature)
    return 1.0 - torch.minimum(logp, logq).exp().sum(-1)


def acceptance(target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    """sum_x min(p(x), q(x)) per token (alpha's integrand); temperature 0 compares argmaxes."""
    if temperature == 0:
        return (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    return 1.0 - acceptance_loss(target_logits, draft_logits, temperature)


def parse(spec: str) -> tuple[str, float]:
    """'fkl' | 'rkl' | 'tvd' | 'accept' | 'jsd' | 'jsd:BETA' -> (kind, beta)."""
    kind, _, arg = spec.strip().lower().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {spec!r}; use one of fkl, rkl, tvd, accept, jsd or jsd:BETA")
    if arg and kind != "jsd":
        raise ValueError(f"divergence {kind!r} takes no parameter (got {spec!r})")
    try:
        beta = float(arg) if arg else 0.5
    except ValueError:
        raise ValueError(f"jsd beta in {spec!r} is not a number; write e.g. jsd:0.5") from None
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta} must lie in [0, 1]")
    return kind, beta


def _checked(spec: str) -> str:
    parse(spec)
    return spec


DivergenceSpec = Annotated[str, AfterValidator(_checked)]  # a config field holding a divergence name (see `parse`)


def token_divergence(spec: str, target_logits, draft_logits, temperature: float = 1.0) -> torch.Tensor:
    """The divergence named by `spec` (see `parse`) per token. [..., V] x2 -> [...]"""
    kind, beta = parse(spec)
    if kind == "jsd":
        return jsd(target_logits, draft_logits, beta, temperature)
    fn = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": total_variation, "accept": acceptance_loss}[kind]
    return fn(target_logits, draft_logits, temperature)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [...] over positions where `mask` [...] is true (all when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def divergence_loss(spec: str, target_logits, draft_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Scalar training loss: the token divergence averaged over the masked (generated) positions."""
    return masked_mean(token_divergence(spec, target_logits, draft_logits, temperature), mask)


__all__ = ["DivergenceSpec", "KINDS", "acceptance", "acceptance_loss", "divergence_loss", "forward_kl", "jsd",
           "masked_mean", "parse", "reverse_kl", "token_divergence", "total_variation"]
