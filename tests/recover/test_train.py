"""Recovery by distillation on tiny models: KL goes down, formats and masks stay, resume is exact."""

import json

import pytest
import torch
from recover_helpers import assert_same_state, compressed_student, tiny_teacher, tokens

from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.models import load, save
from llmcompress.recover import RecoverConfig, check_recoverable, recover, sparse24_keep

FAST = dict(num_samples=8, seq_len=16, batch_size=4, local_steps=12, global_steps=12, local_lr=1e-3, lr=1e-4)


def _compressed(graph) -> dict:
    return {n: m for n, m in graph.model.layers.named_modules() if isinstance(m, (QuantLinear, Sparse24Linear))}


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.mark.parametrize("quantizer", ["ste", "differentiable"])
def test_recovery_reduces_kl_and_keeps_formats(teacher, quantizer, tmp_path):
    student = compressed_student(teacher)  # 2:4 magnitude + int4 RTN g32: badly damaged
    before = {n: (m.fmt, sparse24_keep(m), m.dequantize()) for n, m in _compressed(student).items()}
    mult = 10.0 if quantizer == "differentiable" else 1.0  # levels are all it learns: a larger step
    report = recover(student, teacher, tokens(8, 16), RecoverConfig(**FAST, quantizer=quantizer, scale_lr_mult=mult))
    assert report["kl_after"] < 0.5 * report["kl_before"], report
    after = _compressed(student)
    assert after.keys() == before.keys()
    for n, m in after.items():
        fmt, keep, w = before[n]
        assert m.fmt == fmt == "sparse24_int4" and m.group_size == 32
        assert torch.equal(sparse24_keep(m), keep)  # the 2:4 mask is held fixed
        assert not torch.equal(m.dequantize(), w)  # and the weights learned
    assert not any(p.requires_grad for p in student.parameters())
    # the result is a compressed-tensors checkpoint that loads back bit for bit
    save(student, tmp_path / "m")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["sparsity_config"]["sparsity_structure"] == "2:4"
    back = load(str(tmp_path / "m"))
    assert_same_state(student, back)
    x = tokens(2, 16, seed=5)
    assert torch.equal(student(x).logits, back(x).logits)


@pytest.mark.parametrize("case", ["sparse24", "int4_asym"])
def test_recovery_of_single_formats(teacher, case):
    student = compressed_student(teacher, sparse=case == "sparse24", group_size=0 if case == "sparse24" else 64,
                                 symmetric=False)
    # int4 alone is damaged less: smaller steps (the local phase on the teacher's inputs, layers independent);
    # on this random-weight model most of what 12 steps can recover is in the scales, so they learn at the
    # weights' rate (the default, 0.03x, is what the real model's layers need)
    gentle = {"local_lr": 3e-4, "lr": 3e-5, "scale_lr_mult": 1.0} if case == "int4_asym" else {}
    report = recover(student, teacher, tokens(8, 16), RecoverConfig(**FAST | gentle | {"local_inputs": "teacher"}))
    assert report["kl_after"] < 0.7 * report["kl_before"], report
    fmts = {m.weight_format for m in _compressed(student).values()}
    assert fmts == {"sparse24" if case == "sparse24" else "int4"}


def _interrupt_after(calls: int):
    seen = []

    def progress(label, done, total):
        seen.append(label)
        if len(seen) == calls:
            raise KeyboardInterrupt

    return progress


def test_resume_gives_the_uninterrupted_result(teacher, tmp_path):
    cfg = RecoverConfig(**FAST | {"local_steps": 3, "global_steps": 5, "checkpoint_every": 2})
    data = tokens(8, 16)
    whole = compressed_student(teacher)
    report = recover(whole, teacher, data, cfg, tmp_path / "a")
    ckpt = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # at layer 1's last step, after its checkpoint at step 2
        recover(compressed_student(teacher), teacher, data, cfg, ckpt, _interrupt_after(7))
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["phase"], state["layer"], state["step"]) == ("local", 1, 2)
    with pytest.raises(KeyboardInterrupt):  # in the global phase, after its checkpoint at step 4
        recover(compressed_student(teacher), teacher, data, cfg, ckpt, _interrupt_after(7))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["phase"] == "global" and state["step"] == 4
    resumed = compressed_student(teacher)  # a fresh process starts again from the compressed model
    assert recover(resumed, teacher, data, cfg, ckpt) == report
    assert_same_state(whole, resumed)
    # a finished run is not trained again
    done = compressed_student(teacher)
    recover(done, teacher, data, cfg, ckpt, _interrupt_after(1))
    assert_same_state(whole, done)
    # another configuration is refused with the fix
    with pytest.raises(ValueError, match="remove it or choose another checkpoint folder"):
        recover(compressed_student(teacher), teacher, data, cfg.model_copy(update={"lr": 1e-3}), ckpt)


def test_config_and_models_are_checked_up_front(teacher):
    with pytest.raises(ValueError, match="local_steps or local_tokens"):
        RecoverConfig(local_steps=None)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RecoverConfig(learning_rate=1e-3)
    assert RecoverConfig(local_steps=None, local_tokens=1000, seq_len=100, batch_size=2).steps("local") == 5
    assert RecoverConfig(global_steps=3, global_tokens=10**6).steps("global") == 3
    student = compressed_student(teacher)
    with pytest.raises(ValueError, match=r"hidden_layers \[5\] do not exist; the model has layers 0..1"):
        check_recoverable(student, teacher, RecoverConfig(hidden_layers=[5]))
    with pytest.raises(ValueError, match="the teacher must be the model the student was compressed from"):
        check_recoverable(compressed_student(tiny_teacher(layers=3)), teacher, RecoverConfig())
