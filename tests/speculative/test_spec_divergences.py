"""Token-level divergences: definitions, the JSD ends, temperature and masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmcompress.speculative import divergences as dv


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2  # target, draft


def test_kl_directions(logits):
    t, d = logits
    logp, logq = F.log_softmax(t, -1), F.log_softmax(d, -1)
    def kl(a, b):  # KL(a || b) through torch
        return F.kl_div(b, a, log_target=True, reduction="none").sum(-1)

    assert torch.allclose(dv.forward_kl(t, d), kl(logp, logq), atol=1e-6)
    assert torch.allclose(dv.reverse_kl(t, d), kl(logq, logp), atol=1e-6)
    assert dv.forward_kl(t, t).abs().max() < 1e-6


def test_jsd_ends_and_middle(logits):
    t, d = logits
    assert torch.equal(dv.jsd(t, d, 0.0), dv.forward_kl(t, d))
    assert torch.equal(dv.jsd(t, d, 1.0), dv.reverse_kl(t, d))
    # the ends are the limits of jsd(beta)/beta and jsd(beta)/(1 - beta)
    t64, d64, eps = t.double(), d.double(), 1e-7
    assert torch.allclose(dv.jsd(t64, d64, eps) / eps, dv.forward_kl(t64, d64), rtol=1e-3)
    assert torch.allclose(dv.jsd(t64, d64, 1 - eps) / eps, dv.reverse_kl(t64, d64), rtol=1e-3)
    # beta = 0.5 is the ordinary Jensen-Shannon divergence, bounded by ln 2
    p, q = t.softmax(-1), d.softmax(-1)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(dv.jsd(t, d, 0.5), js, atol=1e-6)
    assert dv.jsd(t, d, 0.5).max() <= math.log(2)


def test_tvd_equals_acceptance_loss(logits):
    t, d = logits
    p, q = t.softmax(-1), d.softmax(-1)
    tvd = dv.total_variation(t, d)
    assert torch.allclose(tvd, 0.5 * (p - q).abs().sum(-1), atol=1e-6)
    assert torch.allclose(tvd, dv.acceptance_loss(t, d), atol=1e-6)
    assert torch.allclose(dv.acceptance(t, d), torch.minimum(p, q).sum(-1), atol=1e-6)
    assert torch.equal(dv.acceptance(t, d, 0), (t.argmax(-1) == d.argmax(-1)).float())


def test_temperature(logits):
    t, d = logits
    for fn in (dv.forward_kl, dv.reverse_kl, dv.total_variation):
        assert torch.allclose(fn(t, d, temperature=2.0), fn(t / 2, d / 2), atol=1e-6)
    assert dv.total_variation(t, d, 100.0).max() < dv.total_variation(t, d, 1.0).max()  # hot: both near uniform
    with pytest.raises(ValueError, match="temperature"):
        dv.forward_kl(t, d, 0.0)


def test_mask_and_gradient(logits):
    t, d = logits
    d = d.clone().requires_grad_()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True  # prompt = first 3 positions
    loss = dv.divergence_loss("jsd:0.5", t, d, mask)
    assert loss.item() == pytest.approx(dv.jsd(t, d.detach(), 0.5)[:, 3:].mean().item(), rel=1e-6)
    loss.backward()
    assert d.grad[:, :3].abs().max() == 0 and d.grad[:, 3:].abs().max() > 0


def test_parse():
    assert dv.parse("jsd:0.9") == ("jsd", 0.9)
    assert dv.parse("TVD") == ("tvd", 0.5)
    for bad, msg in (("kl", "unknown divergence"), ("jsd:x", "not a number"), ("jsd:2", r"\[0, 1\]"),
                     ("fkl:1", "no parameter")):
        with pytest.raises(ValueError, match=msg):
            dv.parse(bad)
