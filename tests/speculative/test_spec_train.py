"""DistillSpec training: masks, offline top-k targets, data sources, learning, checkpoints and resumption."""

import pytest
import torch

from _micro import micro_model
from llmcompress.speculative.train import (DistillConfig, batch_source, continuation_mask, expand_topk,
                                           topk_logprobs, train_draft)


def test_continuation_mask():
    m = continuation_mask(2, 6, 3)
    assert m.shape == (2, 6) and m[0].tolist() == [False, False, True, True, True, False]


def test_expand_topk():
    logits = torch.randn(3, 10)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(expand_topk(*topk_logprobs(logits, 10), 10), full, atol=1e-6)
    part = expand_topk(*topk_logprobs(logits, 4), 10)
    assert torch.allclose(part.exp().sum(-1), torch.ones(3), atol=1e-5)
    top = full.topk(4, -1)
    assert torch.allclose(part.gather(-1, top.indices), top.values)


def test_config_and_mixture():
    with pytest.raises(ValueError, match="online"):
        DistillConfig(data="on-policy", online=False)
    with pytest.raises(ValueError, match="budget"):
        DistillConfig(steps=None)
    assert DistillConfig(steps=None, seconds=60).seconds == 60  # a time budget alone is a budget
    with pytest.raises(ValueError, match="unknown divergence"):
        DistillConfig(divergence="kl")
    cfg = DistillConfig(data="mixture", mixture=0.3)
    share = sum(batch_source(cfg, s) == "on-policy" for s in range(2000)) / 2000
    assert share == pytest.approx(0.3, abs=0.04)


def _setup():
    target = micro_model(layers=2, seed=0)
    draft = micro_model(layers=1, seed=1, hidden=16)  # another width: a learned projection for the features
    windows = torch.randint(0, 6, (16, 24), generator=torch.Generator().manual_seed(0))
    prompts = [windows[i: i + 1, :8] for i in range(2)]
    return target, draft, windows, prompts


def _cfg(**kw):
    base = dict(divergence="tvd", data="fixed", prompt_tokens=8, new_tokens=16, batch_size=4, lr=3e-3, steps=30,
                eval_every=30, eval_prompts=2, eval_new_tokens=8, eval_gamma=2, checkpoint_every=30)
    return DistillConfig(**(base | kw))


@pytest.mark.parametrize("kw", [dict(), dict(online=False, offline_topk=4, divergence="fkl"),
                                dict(data="on-policy", divergence="jsd:0.5", steps=20, eval_every=20)])
def test_training_reduces_the_divergence(kw):
    target, draft, windows, prompts = _setup()
    report = train_draft(target, draft, windows, prompts, _cfg(**kw))
    assert report["steps"] == report["acceptance"][-1]["step"] and report["tokens"] > 0
    assert report["continuation_counts"].sum() == report["tokens"]  # the ids trained on, for a draft vocabulary
    assert report["loss_last"] < report["loss_first"]
    if not kw:  # the long run: acceptance on held-out prompts grows with training
        assert report["acceptance"][-1]["alpha"] > report["acceptance"][0]["alpha"]


def test_resume_continues_the_same_run(tmp_path):
    target, draft_a, windows, prompts = _setup()
    full = train_draft(target, draft_a, windows, prompts, _cfg(steps=6, checkpoint_every=3))
    _, draft_b, _, _ = _setup()
    train_draft(target, draft_b, windows, prompts, _cfg(steps=3, checkpoint_every=3), out=tmp_path)
    _, draft_c, _, _ = _setup()  # a fresh process: resumes at step 3 from the checkpoint, goes on to 6
    # a time budget is a budget too: the resumed run may add one (and change generation batching)
    report = train_draft(target, draft_c, windows, prompts, _cfg(steps=6, checkpoint_every=3, seconds=3600,
                                                                gen_batch_size=8), out=tmp_path)
    assert report["steps"] == 6
    assert torch.equal(report["continuation_counts"], full["continuation_counts"])  # counts survive the resume
    for pa, pc in zip(draft_a.parameters(), draft_c.parameters()):
        assert torch.allclose(pa, pc, atol=1e-6)
    with pytest.raises(ValueError, match="another configuration"):
        train_draft(target, draft_c, windows, prompts, _cfg(steps=6, lr=1e-4), out=tmp_path)


def test_layer_trainer_follows_the_schedule():
    from llmcompress.speculative.schedule import scheduled_lr

    target, draft, windows, prompts = _setup()
    report = train_draft(target, draft, windows, prompts, _cfg(steps=5, eval_every=5, lr_schedule="cosine",
                                                                warmup=1, lr_min=1e-4))
    assert report["lr_by_step"] == pytest.approx([scheduled_lr(s, 3e-3, "cosine", 5, 1, 1e-4) for s in range(5)])
    assert report["lr_by_step"][1] == pytest.approx(3e-3) and report["lr_by_step"][-1] < 1e-3


def test_expand_topk_of_a_peaked_distribution_is_finite():
    from llmcompress.speculative.train import expand_topk, topk_logprobs

    logits = torch.zeros(2, 3, 50)
    logits[..., 7] = 60.0  # top-k mass rounds to 1 (or above) in float32
    vals, ids = topk_logprobs(logits, 4)
    full = expand_topk(vals, ids, 50)
    assert torch.isfinite(full).all()
    assert torch.allclose(full.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    # rounding can even make the kept log-probs sum above 1
    over = expand_topk(torch.tensor([[1e-6, -30.0, -30.0]]), torch.tensor([[0, 1, 2]]), 10)
    assert torch.isfinite(over).all()


def test_time_budget_stops_training_before_the_step_budget():
    target, draft, windows, prompts = _setup()
    report = train_draft(target, draft, windows, prompts, _cfg(steps=10_000, seconds=1e-6, eval_every=10_000))
    assert report["steps"] == 1  # the clock is checked after each step; the step budget is far away
    assert report["acceptance"][-1]["step"] == 1  # and the end of a timed run is still evaluated


def test_greedy_target_pool_is_made_in_full_generate_calls(monkeypatch):
    import llmcompress.speculative.train as train

    target, draft, windows, prompts = _setup()
    calls, real = [], train.generate

    def counting(model, p, *a, **kw):
        calls.append(p[:, :8].tolist())
        return real(model, p, *a, **kw)

    monkeypatch.setattr(train, "generate", counting)
    cfg = _cfg(data="target", gen_temperature=0, online=True, steps=6, eval_every=100, gen_batch_size=8)
    train_draft(target, draft, windows, prompts, cfg)
    sizes = [len(c) for c in calls]
    assert sizes[0] == 8 and all(s <= 8 for s in sizes)  # the first batch's 4 prompts + 4 not made yet
    made = [tuple(r) for c in calls for r in c]
    assert len(made) <= len(windows) and len(calls) <= 3  # 16 prompts: every one made once, in 2-3 calls


def test_sampled_target_pool_makes_fresh_sequences_in_full_calls(monkeypatch):
    import llmcompress.speculative.train as train

    target, draft, windows, prompts = _setup()
    calls, real = [], train.generate

    def counting(model, p, *a, **kw):
        out = real(model, p, *a, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(train, "generate", counting)
    cfg = _cfg(data="target", gen_temperature=1.0, online=True, steps=6, eval_every=100, gen_batch_size=8)
    report = train_draft(target, draft, windows, prompts, cfg)
    assert report["steps"] == 6 and [len(c) for c in calls] == [8, 8, 8]  # batch 4: one call per two steps
    seen = torch.cat(calls)[:, cfg.prompt_tokens:]  # [24, new_tokens]: each trained on once, and counted once
    assert report["continuation_counts"].sum() == seen.numel()
    assert torch.equal(report["continuation_counts"], torch.bincount(seen.flatten(), minlength=len(
        report["continuation_counts"])))
    calls.clear()
    train_draft(target, draft, windows, prompts, cfg.model_copy(update={"gen_batch_size": None}))
    assert [len(c) for c in calls] == [4] * 6  # without a pool size: one call per step, the batch's prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_offline_targets_are_made_once_and_shared(tmp_path, monkeypatch, temperature):
    import llmcompress.speculative.train as train

    target, draft, windows, prompts = _setup()
    calls, real = [], train.generate

    def counting(model, p, *a, **kw):
        calls.append(len(p))
        return real(model, p, *a, **kw)

    monkeypatch.setattr(train, "generate", counting)
    cfg = _cfg(data="target", gen_temperature=temperature, online=False, divergence="fkl", steps=2, eval_every=100,
               gen_batch_size=16)
    first = train_draft(target, draft, windows, prompts, cfg, targets_cache=tmp_path)
    assert calls == [16]  # every window's continuation in one gen_batch_size call, and trained on as made
    assert len(list(tmp_path.glob("offline-targets-*.safetensors"))) == 1
    other = micro_model(layers=1, seed=1, hidden=16)
    again = train_draft(target, other, windows, prompts, cfg.model_copy(update={"divergence": "rkl"}),
                        targets_cache=tmp_path)
    assert calls == [16]  # another divergence over the same data: read back, not made again
    assert torch.equal(first["continuation_counts"], again["continuation_counts"])  # the same sequences
    train_draft(target, micro_model(layers=1, seed=1, hidden=16), windows[:8], prompts, cfg, targets_cache=tmp_path)
    assert calls == [16, 8]  # other windows: made anew, in a file of their own
    assert len(list(tmp_path.glob("offline-targets-*.safetensors"))) == 2


def test_a_frozen_draft_is_trained(tmp_path):
    target, draft, windows, prompts = _setup()
    draft.requires_grad_(False)  # e.g. copied from a target that an earlier training run froze
    before = [p.clone() for p in draft.model.layers.parameters()]
    train_draft(target, draft, windows, prompts, _cfg(steps=2, eval_every=100))
    assert any(not torch.equal(a, b) for a, b in zip(before, draft.model.layers.parameters()))
