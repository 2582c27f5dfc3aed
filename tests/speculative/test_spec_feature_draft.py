"""Feature drafts (EAGLE-style): lossless decoding, the cache invariant, online training, save/load."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache

from _micro import micro_model
from llmcompress.speculative.decode import target_decode
from llmcompress.speculative.feature_draft import (FeatureDistillConfig, FeatureDraft, feature_draft_loss,
                                                   feature_speculative_decode, target_features, train_feature_draft,
                                                   unroll_mask, unrolled_forward)
from llmcompress.speculative.vocab import restrict_vocab

PROMPTS = [[5, 17, 33, 2, 9], [7]]


@pytest.mark.parametrize("vocab,stop_below", [(None, 0.0), (list(range(0, 64, 3)), 0.0), (None, 0.05)])
def test_greedy_equals_target_greedy(tiny_target, vocab, stop_below):
    draft = FeatureDraft.from_target(tiny_target)
    with torch.no_grad():  # a draft that is wrong often: rejections and corrections on most rounds
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    if vocab is not None:
        restrict_vocab(draft.body, torch.tensor(vocab))
    short = 0
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 16)
        for gamma in (1, 2, 3, 5):
            out, stats = feature_speculative_decode(tiny_target, draft, prompt, 16, gamma=gamma, stop_below=stop_below)
            assert torch.equal(out, ref), (ids, gamma)
            assert stats.new_tokens == 16 and stats.target_calls == len(stats.accepted_per_call)
            assert 1 <= stats.tau <= gamma + 1 and 0 <= stats.alpha <= 1
            assert sum(stats.drafted_per_call) == stats.drafted
            short += sum(0 < d < gamma for d in stats.drafted_per_call)  # 0: a one-token prompt's first step
    assert (short > 0) == (stop_below > 0)


def test_draft_cache_holds_only_true_features(tiny_target, monkeypatch):
    """Every draft call after the first continues a cache whose entries were built from the target's true
    features: recomputing the draft from scratch on (true features, tokens) gives the same proposals."""
    draft = FeatureDraft.from_target(tiny_target)
    prompt = torch.tensor([PROMPTS[0]])
    calls = []
    forward = FeatureDraft.forward

    def spy(self, features, tokens, cache=None):
        h, logits = forward(self, features, tokens, cache)
        calls.append((cache.get_seq_length() - tokens.shape[1] if len(cache.layers) else 0, tokens.shape[1],
                      logits[0, -1].argmax().item()))
        return h, logits

    monkeypatch.setattr(FeatureDraft, "forward", spy)
    out, _ = feature_speculative_decode(tiny_target, draft, prompt, 12, gamma=3)
    monkeypatch.setattr(FeatureDraft, "forward", forward)
    with torch.no_grad():
        feats = target_features(tiny_target, out, None)[0]  # [L, D], true features of every position
    # the first draft call of each round starts at the cache's length: entries 1..start hold pairs (f_{t-1}, x_t)
    rounds = [c for i, c in enumerate(calls) if i % 3 == 0]
    for start, new, proposal in rounds:
        end = start + new  # the pairs fed: t = 1 .. end
        with torch.no_grad():
            _, logits = draft(feats[None, :end], out[:, 1:end + 1])
        assert logits[0, -1].argmax().item() == proposal


def test_sampling_matches_target_law():
    """Chi-square test of the first two sampled tokens against the target's exact law (as for layer drafts)."""
    g, temperature, n = torch.Generator().manual_seed(1234), 0.8, 800
    target = micro_model(layers=2, seed=0)
    draft = FeatureDraft.from_target(target)
    with torch.no_grad():
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(3)))
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1] / temperature, -1)
        seqs = torch.cat([prompt.expand(6, -1), torch.arange(6)[:, None]], 1)
        exact = (p1[:, None] * torch.softmax(target(seqs).logits[:, -1] / temperature, -1)).flatten()
    counts, rejections = torch.zeros_like(exact), 0
    for _ in range(n):
        out, stats = feature_speculative_decode(target, draft, prompt, 2, gamma=2, temperature=temperature,
                                                generator=g)
        counts[out[0, 3] * 6 + out[0, 4]] += 1
        rejections += stats.drafted - stats.accepted
    assert rejections > n // 10
    big = exact * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
    exp = torch.cat([exact[big], exact[~big].sum(0, keepdim=True)]).double()
    assert chisquare(obs.numpy(), (exp / exp.sum() * n).numpy()).pvalue > 1e-3


def test_online_training_learns_and_resumes(tmp_path):
    """A few online steps on a micro target's own samples lower the loss and raise top-1 agreement; a rerun
    with a larger budget resumes from the checkpoint; the saved draft loads back identical."""
    target = micro_model(vocab=6, layers=2, seed=0, hidden=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        windows = target.generate(torch.randint(0, 6, (32, 1), generator=g), do_sample=True, max_new_tokens=23,
                                  min_new_tokens=23, pad_token_id=0, attention_mask=torch.ones(32, 1, dtype=torch.long))
    draft = FeatureDraft.from_target(target)
    cfg = FeatureDistillConfig(steps=60, batch_size=8, lr=1e-2, checkpoint_every=30, eval_every=30)
    rep = train_feature_draft(target, draft, windows, cfg, tmp_path)
    assert rep["steps"] == 60 and rep["tokens"] == 60 * 8 * 24
    assert rep["loss_last"] < 0.6 * rep["loss_first"]
    assert rep["top1_last"] > rep["top1_first"] + 0.2
    more = train_feature_draft(target, draft, windows, cfg.model_copy(update={"steps": 70}), tmp_path)
    assert more["steps"] == 70 and more["tokens"] == 70 * 8 * 24  # resumed at 60, not restarted
    draft.save(tmp_path / "out")
    back = FeatureDraft.load(target, tmp_path / "out")
    for k, v in draft.trainable().items():
        assert torch.equal(v, back.trainable()[k])
    with pytest.raises(ValueError, match="feature draft"):
        FeatureDraft.load(target, tmp_path / "missing")


def test_unroll_mask_follows_the_chain_of_proposals():
    m = unroll_mask(4, 2)[0, 0].int()  # keys: 4 true entries, then 4 depth-2 entries
    assert m.tolist() == [[0, 0, 0, 0, 1, 0, 0, 0],  # p = 0 has no chain: only its own entry
                          [1, 0, 0, 0, 0, 1, 0, 0],
                          [1, 1, 0, 0, 0, 0, 1, 0],
                          [1, 1, 1, 0, 0, 0, 0, 1]]
    assert unroll_mask(5, 1)[0, 0].equal(torch.ones(5, 5, dtype=torch.bool).tril())
    m3 = unroll_mask(5, 3)[0, 0].int()
    assert m3[4].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]


def test_unrolled_forward_equals_drafting_step_by_step(tiny_target):
    """Depth d at position p of the parallel unrolled pass is what decoding computes: the true pairs up to
    p - d + 1 in the cache, then d - 1 steps fed the draft's own predicted features."""
    draft = FeatureDraft.from_target(tiny_target)
    with torch.no_grad():
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    seq = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = target_features(tiny_target, seq, None)
        f_in, toks = feats[:, :-1], seq[:, 1:]  # [2, 8, D], [2, 8]
        outs = unrolled_forward(draft, f_in, toks, 3)
        assert len(outs) == 3
        for b in range(2):
            for d in (1, 2, 3):
                for p in range(d - 1, 8):
                    start, cache = p - d + 1, DynamicCache()
                    if start:
                        draft(f_in[b:b + 1, :start], toks[b:b + 1, :start], cache)
                    h, logits = draft(f_in[b:b + 1, start:start + 1], toks[b:b + 1, start:start + 1], cache)
                    for k in range(2, d + 1):
                        h, logits = draft(h, toks[b:b + 1, start + k - 1:start + k], cache)
                    torch.testing.assert_close(outs[d - 1][0][b, p], h[0, 0], atol=1e-5, rtol=1e-4)
                    torch.testing.assert_close(outs[d - 1][1][b, p], logits[0, 0], atol=1e-4, rtol=1e-4)
        # the deeper pass differs from the plain one: it reads predicted, not true, features
        assert not torch.allclose(outs[1][1][:, 1:], outs[0][1][:, 1:], atol=1e-3)


def test_unrolled_training_scores_every_depth(tmp_path):
    target = micro_model(vocab=6, layers=2, seed=0, hidden=32)
    windows = torch.randint(0, 6, (16, 12), generator=torch.Generator().manual_seed(0))
    draft = FeatureDraft.from_target(target)
    with torch.no_grad():
        feats = target_features(target, windows[:4], None)
        tl = target.lm_head(feats)
        one, parts1 = feature_draft_loss(draft, feats, windows[:4], tl, FeatureDistillConfig(unroll=1))
        three, parts3 = feature_draft_loss(draft, feats, windows[:4], tl, FeatureDistillConfig(unroll=3))
    assert "top1_depth2" in parts3 and "top1_depth3" in parts3 and "top1_depth2" not in parts1
    assert parts3["top1"] == parts1["top1"] and not torch.isclose(one, three)
    rep = train_feature_draft(target, draft, windows, FeatureDistillConfig(steps=3, batch_size=4, unroll=3),
                              tmp_path)
    assert rep["steps"] == 3 and rep["config"]["unroll"] == 3 and len(rep["top1_last_by_depth"]) == 3
    with pytest.raises(ValueError, match="unroll"):
        FeatureDistillConfig(unroll=0)
    with pytest.raises(ValueError, match="4-D attention mask"):  # a mask of the wrong length of keys
        draft.body.model(inputs_embeds=torch.zeros(1, 2, 32), attention_mask=torch.ones(1, 1, 2, 3, dtype=torch.bool))


def test_bad_inputs(tiny_target):
    draft = FeatureDraft.from_target(tiny_target)
    with pytest.raises(ValueError, match="gamma"):
        feature_speculative_decode(tiny_target, draft, torch.tensor([[1, 2]]), 3, gamma=0)
    with pytest.raises(ValueError, match="layers"):
        FeatureDraft.from_target(tiny_target, [99])
    with pytest.raises(ValueError, match="budget"):
        train_feature_draft(tiny_target, draft, torch.zeros(2, 4, dtype=torch.long),
                            FeatureDistillConfig(steps=None), "unused")


def _call(*args):
    from typer.testing import CliRunner

    from llmcompress.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_draft_command_trains_a_feature_draft_on_target_sequences(tiny_hf_dir, corpus_file, tmp_path):
    from llmcompress.models import load
    from llmcompress.speculative.draft_init import init_draft

    args = ["draft", "--target", tiny_hf_dir, "--init", "feature:1", "--data", "target", "--offline",
            "--steps", 2, "--prompt-tokens", 8, "--new-tokens", 8, "--num-samples", 8, "--eval-every", 2,
            "--eval-prompts", 1, "--eval-new-tokens", 8, "--draft-vocab", 40, "--lr", 1e-3, "--unroll", 2,
            "--corpus", corpus_file, "--heldout-rows", 10, "--out", tmp_path / "d"]
    r = _call(*args)
    assert r.exit_code == 0, r.output
    import json

    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["steps"] == 2 and [e["step"] for e in report["acceptance"]] == [2]
    assert report["data"] == "target" and not report["online"] and report["train_sequences"] == 8
    assert report["config"]["unroll"] == 2 and len(report["top1_last_by_depth"]) == 2
    assert sorted(p.name for p in (tmp_path / "d" / "sequences").glob("seq-*")) == ["seq-00000.safetensors"]
    target = load(str(tiny_hf_dir))
    draft = init_draft(target, str(tmp_path / "d" / "model"))  # a saved feature draft loads as one
    assert isinstance(draft, FeatureDraft) and draft.lm_head.weight.shape[0] == 40
    prompt = torch.tensor([PROMPTS[0]])
    assert torch.equal(feature_speculative_decode(target, draft, prompt, 10, gamma=3)[0],
                       target_decode(target, prompt, 10)[0])
    r = _call("draft", "--target", tiny_hf_dir, "--init", "feature:1", "--data", "on-policy",
              "--corpus", corpus_file, "--heldout-rows", 10, "--out", tmp_path / "e")
    assert r.exit_code == 2 and "fixed text or the target" in " ".join(r.output.split()), r.output


def test_draft_command_adds_the_corpus_text_to_target_sequences(tiny_hf_dir, corpus_file, tmp_path):
    import json

    from safetensors.torch import load_file

    from llmcompress.models import load

    base = ["draft", "--target", tiny_hf_dir, "--init", "feature:1", "--steps", 1, "--prompt-tokens", 8,
            "--new-tokens", 8, "--num-samples", 8, "--eval-every", 1, "--eval-prompts", 1, "--eval-new-tokens", 4,
            "--corpus", corpus_file, "--heldout-rows", 10]
    r = _call(*base, "--data", "target", "--offline", "--with-fixed-text", "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["train_sequences"] == 16 and report["fixed_text_sequences"] == 8
    cont = load_file(str(tmp_path / "d" / "sequences" / "seq-00000.safetensors"))
    text = load_file(str(tmp_path / "d" / "fixed-text" / "seq-00000.safetensors"))
    # the same 8 corpus windows: their prompts were continued by the target, their own text is added as it is
    assert torch.equal(text["tokens"][:, :8], cont["tokens"][:, :8])
    assert not torch.equal(text["tokens"], cont["tokens"])
    target = load(str(tiny_hf_dir))
    torch.testing.assert_close(text["features"].float(), target_features(target, text["tokens"], None).float(),
                               atol=2e-2, rtol=1e-2)
    r = _call(*base, "--data", "target", "--online", "--with-fixed-text", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["train_sequences"] == 16
    assert not (tmp_path / "o" / "fixed-text").exists()  # online: the target featurises inside each step
    r = _call(*base, "--data", "fixed", "--with-fixed-text", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "use data target" in " ".join(r.output.split()), r.output
    r = _call(*base, "--init", "layers:1", "--data", "target", "--with-fixed-text", "--out", tmp_path / "f")
    assert r.exit_code == 2 and "for feature drafts" in " ".join(r.output.split()), r.output
    r = _call(*base, "--init", "layers:1", "--data", "target", "--unroll", 2, "--out", tmp_path / "g")
    assert r.exit_code == 2 and "--unroll is for feature drafts" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "g").exists()
    assert not (tmp_path / "f").exists()


def test_eval_measures_a_feature_draft(tiny_hf_dir, corpus_file, tmp_path):
    import json

    report = tmp_path / "r.json"
    r = _call("eval", tiny_hf_dir, "--no-perplexity", "--no-speed", "--data", corpus_file, "--heldout-rows", 10,
              "--draft", "feature:1", "--gammas", "1,3", "--spec-prompts", 2, "--spec-new-tokens", 5,
              "--report", report)
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["draft_kind"] == "feature" and spec["draft_layers"] == 1
    assert all(g["identical_output"] for g in spec["gammas"]) and 0 < spec["cost_ratio_c"]
    r = _call("eval", tiny_hf_dir, "--no-perplexity", "--no-speed", "--draft", "feature:x")
    assert r.exit_code == 2 and "feature:K" in r.output, r.output


def test_balanced_inputs_equalise_feature_and_embedding(tiny_target):
    calib = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    draft = FeatureDraft.from_target(tiny_target, calib=calib)
    rms = draft.balance_inputs(tiny_target, calib)
    with torch.no_grad():
        f = target_features(tiny_target, calib, None)
        e = tiny_target.model.embed_tokens(calib)
        d = f.shape[-1]
        part_f = f @ draft.fc.weight[:, :d].T
        part_e = e @ draft.fc.weight[:, d:].T
    rf, re = part_f.pow(2).mean().sqrt(), part_e.pow(2).mean().sqrt()
    assert torch.allclose(rf, re, rtol=1e-4)
    assert torch.allclose(rf * 2 ** 0.5, torch.tensor(rms["residual"]), rtol=1e-4)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    target = micro_model(vocab=6, layers=2, seed=0, hidden=32)
    windows = torch.randint(0, 6, (8, 12), generator=torch.Generator().manual_seed(0))
    cfg = FeatureDistillConfig(steps=2, batch_size=4)
    train_feature_draft(target, FeatureDraft.from_target(target), windows, cfg, tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        train_feature_draft(target, FeatureDraft.from_target(target), windows,
                            cfg.model_copy(update={"lr": 1e-2, "steps": 3}), tmp_path)


def test_cached_sequences_are_reused_by_prefix_and_checked(tmp_path):
    from llmcompress.speculative.feature_draft import cache_target_sequences

    target = micro_model(vocab=6, layers=2, seed=0, hidden=32)
    prompts = torch.randint(0, 6, (6, 4), generator=torch.Generator().manual_seed(0))
    seqs, feats = cache_target_sequences(target, prompts[:4], 5, tmp_path, chunk=2)
    assert seqs.shape == (4, 9) and feats.shape == (4, 9, 32) and feats.dtype == torch.float16
    assert torch.equal(seqs[:, :4], prompts[:4])
    assert torch.equal(seqs[:1], target_decode(target, prompts[:1], 5)[0])  # greedy continuations
    with torch.no_grad():
        assert torch.allclose(feats[:1].float(), target_features(target, seqs[:1], None), atol=1e-2)
    stamp = (tmp_path / "seq-00000.safetensors").stat().st_mtime_ns
    more, _ = cache_target_sequences(target, prompts, 5, tmp_path, chunk=2)  # two more prompts: one new chunk
    assert torch.equal(more[:4], seqs) and more.shape == (6, 9)
    assert (tmp_path / "seq-00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other prompts"):
        cache_target_sequences(target, prompts.flip(0), 5, tmp_path, chunk=2)
    with pytest.raises(ValueError, match="other settings"):
        cache_target_sequences(target, prompts, 3, tmp_path, chunk=2)
