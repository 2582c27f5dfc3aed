"""The draft trainers' learning-rate schedule, and that the feature trainer follows it."""

import json
import math

import pytest
import torch

from llmcompress.speculative.schedule import scheduled_lr

from _micro import micro_model


def test_constant_with_warmup():
    lrs = [scheduled_lr(s, 1e-3, "constant", 10, warmup=4) for s in range(10)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == [1e-3] * 6


def test_cosine_ends_and_midpoint():
    steps, warmup = 12, 2
    lrs = [scheduled_lr(s, 2e-3, "cosine", steps, warmup, lr_min=1e-4) for s in range(steps + 3)]
    assert lrs[:2] == pytest.approx([1e-3, 2e-3])
    assert lrs[2] == pytest.approx(2e-3)  # the decay starts at the warm-up's end
    assert lrs[7] == pytest.approx(1e-4 + 0.5 * (2e-3 - 1e-4))  # halfway through the 10 decay steps
    assert lrs[12] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # never rises after the warm-up
    assert scheduled_lr(3, 1.0, "cosine", 6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="give steps"):
        scheduled_lr(0, 1e-3, "cosine", None)
    with pytest.raises(ValueError, match="not one of"):
        scheduled_lr(0, 1e-3, "linear", 10)
    from llmcompress.speculative.feature_draft import FeatureDistillConfig
    from llmcompress.speculative.train import DistillConfig
    for cls in (FeatureDistillConfig, DistillConfig):
        with pytest.raises(ValueError, match="give steps"):
            cls(lr_schedule="cosine", steps=None, seconds=10)
        with pytest.raises(ValueError):
            cls(lr_schedule="step")


def test_feature_trainer_follows_the_schedule_and_resumes_older_checkpoints(tmp_path):
    """Each step's logged learning rate is the schedule's; a checkpoint written before the schedule fields existed
    (its identity lacks them) resumes under the constant default, and is refused under another schedule."""
    from llmcompress.speculative.feature_draft import FeatureDistillConfig, FeatureDraft, train_feature_draft

    target = micro_model(vocab=6, layers=2, seed=0, hidden=32)
    windows = torch.randint(0, 6, (8, 12), generator=torch.Generator().manual_seed(0))
    cfg = FeatureDistillConfig(steps=6, lr=1e-2, lr_schedule="cosine", warmup=2, batch_size=4)
    assert train_feature_draft(target, FeatureDraft.from_target(target), windows, cfg, tmp_path / "a")["steps"] == 6
    log = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())["log"]
    assert [r["lr"] for r in log] == pytest.approx([scheduled_lr(s, 1e-2, "cosine", 6, 2) for s in range(6)])
    assert log[1]["lr"] == pytest.approx(1e-2) and log[-1]["lr"] < 2e-3

    plain = FeatureDistillConfig(steps=2, batch_size=4)
    train_feature_draft(target, FeatureDraft.from_target(target), windows, plain, tmp_path / "b")
    state_file = tmp_path / "b" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    for k in ("lr_schedule", "warmup", "lr_min"):
        del state["identity"][k]
    state_file.write_text(json.dumps(state))
    more = train_feature_draft(target, FeatureDraft.from_target(target), windows,
                               plain.model_copy(update={"steps": 3}), tmp_path / "b")
    assert more["steps"] == 3  # resumed at 2
    with pytest.raises(ValueError, match="other settings"):
        train_feature_draft(target, FeatureDraft.from_target(target), windows,
                            plain.model_copy(update={"steps": 4, "lr_schedule": "cosine"}), tmp_path / "b")
