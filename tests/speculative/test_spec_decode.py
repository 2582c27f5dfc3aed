"""Speculative decoding is lossless: greedy output equals the target's; samples follow the target's law."""

import pytest
import torch
from scipy.stats import chisquare

from _micro import micro_model
from llmcompress.speculative.decode import (DecodeStats, feed, keep_drafting, prefill, residual, rollback,
                                            speculative_decode, target_decode, verify)
from llmcompress.speculative.draft_init import keep_layers
from llmcompress.speculative.vocab import restrict_vocab

PROMPTS = [[5, 17, 33, 2, 9], [7]]



@pytest.mark.parametrize("layers,stop_below", [([0], 0.0), ([0, 3], 0.0), ([0], 0.05)])
def test_greedy_equals_target_greedy(tiny_target, layers, stop_below):
    draft = keep_layers(tiny_target, layers)
    short = 0
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 16)
        hf = tiny_target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
        assert torch.equal(ref, hf)  # our baseline loop is transformers' greedy decoding
        for gamma in (1, 2, 3, 5):
            out, stats = speculative_decode(tiny_target, draft, prompt, 16, gamma=gamma, stop_below=stop_below)
            assert torch.equal(out, ref), (ids, gamma)
            assert stats.new_tokens == 16 and stats.target_calls == len(stats.accepted_per_call)
            assert 1 <= stats.tau <= gamma + 1 and 0 <= stats.alpha <= 1
            assert sum(stats.drafted_per_call) == stats.drafted and max(stats.drafted_per_call) <= gamma
            short += sum(d < gamma for d in stats.drafted_per_call)
    assert (short > 0) == (stop_below > 0)  # the threshold cut some rounds short, and only with it


def test_self_draft_accepts_everything(tiny_target):
    prompt = torch.tensor([PROMPTS[0]])
    for temperature in (0.0, 1.0):
        out, stats = speculative_decode(tiny_target, tiny_target, prompt, 12, gamma=3, temperature=temperature,
                                        generator=torch.Generator().manual_seed(0))
        assert stats.accepted == stats.drafted and stats.tau == 4 and stats.alpha == pytest.approx(1)
        assert stats.target_calls == 3 and out.shape[1] == prompt.shape[1] + 12
        assert stats.acceptance_by_position == [1.0, 1.0, 1.0]


def test_acceptance_by_position_is_conditional():
    # calls kept 0, 1, 3, 2 and 3 of 3 draft tokens: position 1 kept in 4 of 5 calls, position 2 in 3 of those 4,
    # position 3 in 2 of those 3
    stats = DecodeStats(gamma=3, accepted_per_call=[0, 1, 3, 2, 3])
    assert stats.acceptance_by_position == pytest.approx([4 / 5, 3 / 4, 2 / 3])
    assert DecodeStats(gamma=2).acceptance_by_position == [0.0, 0.0]
    assert "acceptance_by_position" in stats.as_dict()
    # rounds cut short: a call that drafted 1 token and kept it says nothing about position 2
    short = DecodeStats(gamma=2, accepted_per_call=[1, 1, 2], drafted_per_call=[1, 2, 2])
    assert short.acceptance_by_position == pytest.approx([1.0, 1 / 2])
    assert short.merge(stats).drafted_per_call == [1, 2, 2]


def test_keep_drafting_reads_the_draft_probability():
    logits = torch.tensor([2.0, 1.0, 0.0])  # softmax: 0.665, 0.245, 0.090
    q = torch.softmax(logits, -1)
    assert keep_drafting(logits, q, 0, 0.0, 0.0) and keep_drafting(logits, q, 2, 0.0, 0.0)  # 0: always
    assert keep_drafting(logits, torch.tensor([1.0, 0, 0]), 0, 0.0, 0.6)  # greedy: softmax, not the one-hot
    assert not keep_drafting(logits, torch.tensor([1.0, 0, 0]), 0, 0.0, 0.7)
    assert keep_drafting(logits, torch.tensor([0.1, 0.8, 0.1]), 1, 1.0, 0.7)  # sampling: q itself
    assert not keep_drafting(logits, torch.tensor([0.1, 0.8, 0.1]), 0, 1.0, 0.7)


def test_rollback_restores_cache(tiny_target):
    seq = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7]])
    full = tiny_target(seq).logits[0]  # [10, V]
    cache = prefill(tiny_target, seq)  # holds 9 positions
    feed(tiny_target, seq, cache, torch.tensor([[1, 2, 3]]))  # speculate 3 wrong tokens after the last one
    rollback(cache, 6)
    assert cache.get_seq_length() == 6
    logits = feed(tiny_target, seq, cache)  # re-feeds positions 6..9
    assert torch.allclose(logits, full[6:], atol=1e-5)


def test_verify_rule():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.6, 0.3], [0.0, 1.0, 0.0]])
    assert verify([1, 2], q, p, greedy=True) == (2, 0)  # both argmaxes agree: bonus = argmax p[2]
    assert verify([2, 2], q, p, greedy=True) == (0, 1)  # first disagrees: replaced by argmax p[0]
    # p = q at position 0 always accepts; q puts all its mass on token 1 where p has 0.2: residual [.2, 0, .6] / .8
    assert torch.allclose(residual(p[1], q[1]), torch.tensor([0.25, 0.0, 0.75]))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        n, nxt = verify([1, 1], q, p, greedy=False, generator=g)
        assert n >= 1
        counts[1 if n == 2 else nxt] += 1  # the second emitted token
    assert torch.allclose(counts / 2000, p[1], atol=0.04)


def _exact_two_token_law(model, prompt, temperature):
    """P(x1, x2 | prompt) of target-only sampling. -> [V, V]"""
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1] / temperature, -1)  # [V]
        V = p1.numel()
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)  # [V, P + 1]
        p2 = torch.softmax(model(seqs).logits[:, -1] / temperature, -1)  # [V, V]
    return p1[:, None] * p2


@pytest.mark.parametrize("draft_vocab,stop_below", [(None, 0.0), ([0, 2, 3], 0.0), (None, 0.3)])
def test_sampling_matches_target_law(draft_vocab, stop_below):
    """Chi-square test of the first two sampled tokens against the target's exact law (36 cells, fixed seed).
    With a restricted draft vocabulary, q is zero on half the ids: the law must still be the target's."""
    g, temperature, n = torch.Generator().manual_seed(1234), 0.8, 800
    target = micro_model(layers=2, seed=0)
    draft = micro_model(layers=1, seed=1)  # an unrelated draft: many rejections and residual draws
    if draft_vocab is not None:
        restrict_vocab(draft, torch.tensor(draft_vocab))
    prompt = torch.tensor([[1, 2, 3]])
    exact = _exact_two_token_law(target, prompt, temperature).flatten()
    draft_law = _exact_two_token_law(draft, prompt, temperature).flatten()
    counts = torch.zeros_like(exact)
    rejections = 0
    for _ in range(n):
        out, stats = speculative_decode(target, draft, prompt, 2, gamma=2, temperature=temperature, generator=g,
                                        stop_below=stop_below)
        x1, x2 = out[0, 3:5].tolist()
        counts[x1 * 6 + x2] += 1
        rejections += stats.drafted - stats.accepted
    assert rejections > n // 4  # the residual path is exercised
    big = exact * n >= 5  # pool rare cells so every expected count is >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
    exp = torch.cat([exact[big], exact[~big].sum(0, keepdim=True)]).double()
    exp = exp / exp.sum() * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    # power: the draft's own law, sampled as often, would fail the same test by far
    drafted = torch.cat([draft_law[big], draft_law[~big].sum(0, keepdim=True)]).double()
    drafted = drafted / drafted.sum() * n
    assert chisquare(drafted.numpy(), exp.numpy()).pvalue < 1e-6


def test_bad_inputs(tiny_target):
    with pytest.raises(ValueError, match=r"\[1, P\]"):
        target_decode(tiny_target, torch.tensor([[1], [2]]), 3)
    with pytest.raises(ValueError, match="gamma"):
        speculative_decode(tiny_target, tiny_target, torch.tensor([[1]]), 3, gamma=0)
