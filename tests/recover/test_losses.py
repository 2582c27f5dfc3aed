"""The distillation losses against hand computations."""

import math

import pytest
import torch

from llmcompress.recover import distill_loss, hidden_cosine, hidden_loss, hidden_mse, kl_logits


def test_kl_logits_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3)]])  # q = (1/4, 3/4)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_logits(student, teacher).item() == pytest.approx(want, rel=1e-6)
    # temperature 2: logits are halved, and the KL is scaled by T² = 4
    assert kl_logits(2 * student, 2 * teacher, temperature=2).item() == pytest.approx(4 * want, rel=1e-6)
    assert kl_logits(teacher, teacher).item() == pytest.approx(0, abs=1e-7)


def test_kl_logits_averages_masked_tokens():
    t = torch.zeros(1, 3, 2)  # [B, S, V]
    s = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]])
    one = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    mask = torch.tensor([[True, True, False]])
    assert kl_logits(s, t, mask=mask).item() == pytest.approx(one / 2, rel=1e-6)
    with pytest.raises(ValueError, match="temperature must be positive"):
        kl_logits(s, t, temperature=0)


def test_hidden_losses_by_hand():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert hidden_mse(s, t, relative=False).item() == pytest.approx(2.0)  # (0² + 2²) / 2
    assert hidden_mse(s, t).item() == pytest.approx(4.0)  # / mean(t²) = 1/2
    s, t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert hidden_cosine(s, t).item() == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    assert hidden_loss("cosine", s, t).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="use mse or cosine"):
        hidden_loss("l1", s, t)


def test_distill_loss_mixes_with_weights():
    ts, ss = torch.zeros(1, 1, 2), torch.tensor([[[0.0, math.log(3)]]])
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    h_s = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.0, 0.0]]])]
    h_t = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]])]
    loss, parts = distill_loss(ss, ts, h_s, h_t, kl_weight=2.0, hidden_weight=0.5)
    assert parts["hidden"] == pytest.approx(2.0)  # mean of the layers' relative MSEs 4 and 0
    assert loss.item() == pytest.approx(2 * kl + 0.5 * 2.0, rel=1e-6)
    loss, parts = distill_loss(ss, ts, h_s, h_t, hidden_weight=0.0)
    assert "hidden" not in parts and loss.item() == pytest.approx(kl, rel=1e-6)
    with pytest.raises(ValueError, match="same layers on both sides"):
        distill_loss(ss, ts, h_s, h_t[:1], hidden_weight=1.0)
