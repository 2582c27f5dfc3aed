"""Distillation losses as pure functions (GPUSQ's mixed strategy: logits plus per-layer hidden states).

  kl_logits     KL(p_teacher || q_student) of the softmaxes at temperature T, times T² (Hinton's scaling,
                so gradients keep their size as T changes), averaged over tokens
  hidden_mse    mean squared error, optionally relative to the teacher's mean square (scale-free, so one
                weight fits every layer whatever the size of its residual stream)
  hidden_cosine 1 - cosine similarity per token, averaged
  distill_loss  kl_weight * KL + hidden_weight * mean over the chosen layers of the hidden loss
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

HiddenLoss = Literal["mse", "cosine"]


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., D] -> [T, D] (the positions where mask [...] is True)."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """student, teacher: [..., V] logits; mask: bool [...] or None. -> scalar"""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = F.log_softmax(_tokens(student, mask).float() / temperature, -1)  # [T, V]
    t = F.log_softmax(_tokens(teacher, mask).float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, relative: bool = True,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """student, teacher: [..., D]. mean((s - t)²), divided by mean(t²) when relative. -> scalar"""
    s, t = _tokens(student, mask).float(), _tokens(teacher, mask).float()
    mse = (s - t).pow(2).mean()
    return mse / t.pow(2).mean().clamp_min(1e-12) if relative else mse


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """student, teacher: [..., D]. mean over tokens of 1 - cos(s, t). -> scalar"""
    s, t = _tokens(student, mask).float(), _tokens(teacher, mask).float()
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()


def hidden_loss(kind: HiddenLoss, student: torch.Tensor, teacher: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "mse":
        return hidden_mse(student, teacher, mask=mask)
    if kind == "cosine":
        return hidden_cosine(student, teacher, mask=mask)
    raise ValueError(f"unknown hidden-state loss {kind!r}; use mse or cosine")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 student_hidden: Sequence[torch.Tensor] = (), teacher_hidden: Sequence[torch.Tensor] = (),
                 *, temperature: float = 1.0, kl_weight: float = 1.0, hidden_weight: float = 0.0,
                 hidden: HiddenLoss = "mse", mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The mixed loss. logits [B, S, V]; hidden: per chosen layer [B, S, D] (same count on both sides).
    -> (loss, {"kl": float, "hidden": float})"""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states against {len(teacher_hidden)} of the "
                         "teacher; pick the same layers on both sides")
    kl = kl_logits(student_logits, teacher_logits, temperature, mask)
    loss, parts = kl_weight * kl, {"kl": kl.item()}
    if hidden_weight > 0 and student_hidden:
        h = torch.stack([hidden_loss(hidden, s, t, mask) for s, t in zip(student_hidden, teacher_hidden)]).mean()
        loss, parts["hidden"] = loss + hidden_weight * h, h.item()
    return loss, parts
