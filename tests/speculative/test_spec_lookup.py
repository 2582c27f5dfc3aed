"""Prompt lookup: the proposal rule, and decoding with looked-up proposals (alone or beside a draft) stays exact."""

import json

import pytest
import torch
from scipy.stats import chisquare
from typer.testing import CliRunner

from _micro import micro_model
from llmcompress.cli import app
from llmcompress.speculative.decode import DecodeStats, speculative_decode, target_decode
from llmcompress.speculative.draft_init import keep_layers
from llmcompress.speculative.evaluate import SpecEvalConfig, evaluate_speculative
from llmcompress.speculative.feature_draft import FeatureDraft, feature_speculative_decode
from llmcompress.speculative.lookup import LookupConfig, lookup_proposal

# prompts that repeat themselves, so that the context holds matches from the first round on
PROMPTS = [[5, 17, 33, 2, 9, 5, 17, 33, 2, 9, 5, 17], [7, 8, 7, 8, 7], [11]]


def test_proposal_takes_the_longest_suffix_and_its_latest_occurrence():
    ctx = [1, 2, 3, 9, 2, 3, 4, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 0 (followed by 9, 2, ...); [2, 3] alone occurred later, at 4 (followed by 4)
    assert lookup_proposal(ctx, 3, 1, 3) == [9, 2, 3]
    assert lookup_proposal(ctx, 2, 1, 3) == [4, 1, 2]  # the latest occurrence of [2, 3]
    assert lookup_proposal(ctx, 3, 1, 1) == [9]
    assert lookup_proposal([4, 5, 6, 7], 3, 1, 4) == []  # nothing repeats
    assert lookup_proposal([4, 5, 6, 4], 3, 2, 4) == []  # only a 1-gram matches, below min_ngram
    assert lookup_proposal([4, 5, 6, 4], 3, 1, 4) == [5, 6, 4]  # the proposal may run into the suffix itself
    assert lookup_proposal([7, 7, 7], 2, 1, 4) == [7]  # an overlapping occurrence continues the repetition
    assert lookup_proposal([3], 3, 1, 4) == [] and lookup_proposal([], 3, 1, 4) == []


def test_config_refuses_min_above_max():
    with pytest.raises(ValueError, match="min_ngram"):
        LookupConfig(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError):
        LookupConfig(tokens=0)


def _wrong_feature_draft(target):
    draft = FeatureDraft.from_target(target)
    with torch.no_grad():  # a draft that is often wrong
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return draft


@pytest.mark.parametrize("kind", ["none", "layers", "feature"])
def test_greedy_with_lookup_equals_target_greedy(tiny_target, kind):
    draft = {"none": None, "layers": keep_layers(tiny_target, [0]), "feature": _wrong_feature_draft(tiny_target)}[kind]
    decode = feature_speculative_decode if kind == "feature" else speculative_decode
    totals = DecodeStats()
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 20)
        for look in (LookupConfig(max_ngram=3, min_ngram=1, tokens=4), LookupConfig(max_ngram=2, tokens=2)):
            out, stats = decode(tiny_target, draft, prompt, 20, gamma=3, lookup=look)
            assert torch.equal(out, ref), (ids, look)
            assert stats.new_tokens == 20 and stats.target_calls == len(stats.accepted_per_call)
            assert stats.lookup_rounds == sum(stats.looked_up_per_call) <= stats.target_calls
            assert stats.drafted == sum(d for d, lk in zip(stats.drafted_per_call, stats.looked_up_per_call)
                                        if not lk)
            if draft is None:
                assert stats.drafted == 0 and stats.overlap_count == 0
            totals = totals.merge(stats)
    assert totals.lookup_rounds > 0 and 0 < totals.lookup_accepted < totals.lookup_proposed  # kept and rejected
    if draft is not None:
        assert totals.drafted > 0  # the draft model took the rounds without a match


def test_alpha_and_kept_by_position_leave_lookup_rounds_out():
    # three calls: a drafted round keeping 1 of 2, a looked-up round keeping 3 of 4, a drafted round keeping 2 of 2
    stats = DecodeStats(gamma=2, target_calls=3, accepted_per_call=[1, 3, 2], drafted_per_call=[2, 4, 2],
                        looked_up_per_call=[False, True, False])
    assert stats.acceptance_by_position == [1.0, 0.5]
    assert stats.tau == pytest.approx((1 + 3 + 2 + 3) / 3)  # tau counts every round
    merged = stats.merge(DecodeStats(gamma=2, lookup_rounds=1, lookup_proposed=4, lookup_accepted=3))
    assert (merged.lookup_rounds, merged.lookup_proposed, merged.lookup_accepted) == (1, 4, 3)


@pytest.mark.parametrize("kind", ["none", "layers", "feature"])
def test_sampling_with_lookup_matches_target_law(kind):
    """Chi-square test of the first two sampled tokens against the target's exact law. The prompt repeats, so
    the first round always proposes looked-up tokens, one-hot drafts that are often rejected."""
    g, temperature, n = torch.Generator().manual_seed(4321), 0.8, 800
    target = micro_model(layers=2, seed=0)
    draft = {"none": None, "layers": micro_model(layers=1, seed=1), "feature": FeatureDraft.from_target(target)}[kind]
    decode = feature_speculative_decode if kind == "feature" else speculative_decode
    prompt = torch.tensor([[1, 2, 3, 1, 2]])  # suffix [1, 2] occurred before: proposes [3, 1]
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1] / temperature, -1)
        seqs = torch.cat([prompt.expand(6, -1), torch.arange(6)[:, None]], 1)
        exact = (p1[:, None] * torch.softmax(target(seqs).logits[:, -1] / temperature, -1)).flatten()
    counts, rejected, looked = torch.zeros_like(exact), 0, 0
    look = LookupConfig(max_ngram=2, min_ngram=1, tokens=2)
    for _ in range(n):
        out, stats = decode(target, draft, prompt, 2, gamma=2, temperature=temperature, generator=g, lookup=look)
        counts[out[0, 5] * 6 + out[0, 6]] += 1
        rejected += stats.lookup_proposed - stats.lookup_accepted
        looked += stats.lookup_rounds
    assert looked >= n and rejected > n // 10  # the one-hot proposals and their residual draws are exercised
    big = exact * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
    exp = torch.cat([exact[big], exact[~big].sum(0, keepdim=True)]).double()
    assert chisquare(obs.numpy(), (exp / exp.sum() * n).numpy()).pvalue > 1e-3


def test_evaluate_lookup_alone_against_transformers(tiny_target):
    cfg = SpecEvalConfig(prompts=2, new_tokens=8, cost_steps=4, compare_hf=True,
                         lookup=LookupConfig(max_ngram=2, min_ngram=1, tokens=3))
    r = evaluate_speculative(tiny_target, None, [torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[1]])], cfg)
    assert r["draft_kind"] == "none" and r["cost_ratio_c"] == 0 and r["lookup"]["tokens"] == 3
    (row,) = r["gammas"]  # one row: lookup alone has no gamma of its own
    assert row["gamma"] == 3 and row["identical_output"] and row["hf_identical_output"]
    assert row["lookup_rounds"] > 0 and row["predicted_speedup"] is None and row["measured_speedup"] > 0
    assert row["acceptance_by_position"] == []  # no draft model's rounds to count
    assert "prompt lookup" in r["protocol"]
    json.dumps(r)
    with pytest.raises(ValueError, match="nothing proposes"):
        evaluate_speculative(tiny_target, None, [torch.tensor([PROMPTS[0]])], SpecEvalConfig(prompts=1))
    with pytest.raises(ValueError, match="not both"):
        evaluate_speculative(tiny_target, keep_layers(tiny_target, [0]), [torch.tensor([PROMPTS[0]])],
                             cfg.model_copy(update={"compare_hf": True}))
    with pytest.raises(ValueError, match="greedy"):
        evaluate_speculative(tiny_target, None, [torch.tensor([PROMPTS[0]])],
                             cfg.model_copy(update={"temperature": 1.0}))
    with pytest.raises(ValueError, match="nothing proposes|draft model, a lookup"):
        speculative_decode(tiny_target, None, torch.tensor([PROMPTS[0]]), 4)


def test_cli_eval_lookup(tiny_hf_dir, corpus_file, tmp_path):
    runner = CliRunner()
    report = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file),
                            "--heldout-rows", "10", "--lookup", "3", "--lookup-tokens", "4", "--spec-prompts", "2",
                            "--spec-new-tokens", "6", "--report", str(report)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["draft"] is None and spec["lookup"] == {"max_ngram": 3, "min_ngram": 2, "tokens": 4}
    assert "prompt lookup" in r.output and "alone" in r.output
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file),
                            "--heldout-rows", "10", "--draft", "layers:2", "--lookup", "2", "--gammas", "2",
                            "--spec-prompts", "1", "--spec-new-tokens", "5", "--report", str(tmp_path / "r2.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r2.json").read_text())["speculative"]["lookup"]["max_ngram"] == 2
    for bad, hint in ((["--lookup", "-1"], "--lookup"), (["--lookup", "2", "--lookup-tokens", "0"], "tokens")):
        r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", *bad])
        assert r.exit_code == 2 and r.output.startswith("error:") and hint in r.output, r.output
