"""Assembling a Puzzle solution, global distillation, and the deployable checkpoint."""

import copy
import json

import pytest
import torch

from puzzle_helpers import tiny_tokens
from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, load, save
from llmcompress.models.graph import blocks
from llmcompress.puzzle import GKDConfig, assemble, gkd_loss, train_gkd
from llmcompress.puzzle.gkd import cosine_distance


def mixed_choice(library):
    return [BlockConfig(attention=AttentionConfig(kind="linear"), ffn=FFNConfig(intermediate_size=64)),
            BlockConfig(attention=library.attention[1], ffn=FFNConfig(kind="noop")),
            BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="linear"))]


def test_loss_parts():
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    loss, parts = gkd_loss(h, h, logits, logits, ids, GKDConfig())
    assert loss.item() == pytest.approx(0, abs=1e-6) and set(parts) == {"cosine", "kl"}
    assert cosine_distance(h[1], -h[1]).item() == pytest.approx(2.0)
    _, parts = gkd_loss(h, [h[0], -h[1], h[2]], logits, logits, ids, GKDConfig(lm_weight=1.0))
    assert parts["cosine"] == pytest.approx(1.0) and "lm" in parts  # layer 1 opposite, layer 2 equal
    with pytest.raises(ValueError, match="layer by layer"):
        gkd_loss(h, h[:2], logits, logits, ids, GKDConfig())


@pytest.mark.parametrize("kl_weight,lm_weight", [(1.0, 0.5), (0.0, 0.5), (1.0, 0.0)])
def test_kl_and_lm_parts_match_their_definitions(kl_weight, lm_weight):
    torch.manual_seed(0)
    h = [torch.randn(2, 5, 8) for _ in range(2)]
    t_logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    s_logits = torch.randn(2, 5, 11, requires_grad=True)
    cfg = GKDConfig(cosine_weight=0.0, kl_weight=kl_weight, lm_weight=lm_weight)
    loss, parts = gkd_loss(h, h, t_logits, s_logits, ids, cfg)
    t, s = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    lm = torch.nn.functional.cross_entropy(s_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ref = kl_weight * kl + lm_weight * lm
    assert set(parts) == {k for k, w in (("kl", kl_weight), ("lm", lm_weight)) if w}
    assert parts.get("kl", kl.item()) == pytest.approx(kl.item(), rel=1e-5)
    assert parts.get("lm", lm.item()) == pytest.approx(lm.item(), rel=1e-5)
    grad, = torch.autograd.grad(loss, s_logits)
    ref_grad, = torch.autograd.grad(ref, s_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_assemble(parent, library, bld_dir):
    same, rows = assemble(parent, library, [library.parent] * 3, bld_dir)
    tokens = tiny_tokens(2)
    with torch.no_grad():
        assert torch.equal(same(tokens).logits, parent(tokens).logits)
    child, rows = assemble(parent, library, mixed_choice(library), bld_dir)
    assert blocks(child) == mixed_choice(library) and blocks(parent) == [library.parent] * 3
    assert rows[0]["trained"] == {"attention": True, "ffn": True} and rows[1]["trained"] == {"attention": True}
    # the BLD weights are the ones in the assembled layer
    from safetensors.torch import load_file

    w = load_file(str(bld_dir / "blocks" / "L000.ffn.mlp_64.safetensors"))["mlp.down_proj.weight"]
    assert torch.equal(child.model.layers[0].mlp.down_proj.weight, w)
    with pytest.raises(ValueError, match="3-layer parent"):
        assemble(parent, library, [library.parent] * 2)


def test_gkd_interrupted_run_resumes_to_the_same_model(parent, library, bld_dir, tmp_path):
    tokens = tiny_tokens(8, seed=3)
    cfg = GKDConfig(tokens=4 * 2 * 32, batch_size=2, lr=3e-3, checkpoint_every=2)
    # a frozen parent (an earlier stage's doing) must not freeze the student's copies; a copy, the fixture is shared
    parent = copy.deepcopy(parent).requires_grad_(False)
    whole, _ = assemble(parent, library, mixed_choice(library), bld_dir)
    train_gkd(parent, whole, tokens, cfg, tmp_path / "whole")

    def stop_at_3(label, done, total):
        if done == 3:
            raise KeyboardInterrupt

    cut, _ = assemble(parent, library, mixed_choice(library), bld_dir)
    with pytest.raises(KeyboardInterrupt):
        train_gkd(parent, cut, tokens, cfg, tmp_path / "cut", progress=stop_at_3)
    fresh, _ = assemble(parent, library, mixed_choice(library), bld_dir)  # a new process: weights from the checkpoint
    rep = train_gkd(parent, fresh, tokens, cfg, tmp_path / "cut")
    assert rep["resumed_from"] == 2 and rep["step"] == 4
    start, _ = assemble(parent, library, mixed_choice(library), bld_dir)
    for (name, a), b, s in zip(whole.named_parameters(), fresh.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after the resume")
        assert not torch.equal(a, s), f"{name} was not trained"


def test_gkd_trains_resumes_and_saves(parent, library, bld_dir, tmp_path):
    child, _ = assemble(parent, library, mixed_choice(library), bld_dir)
    tokens = tiny_tokens(8, seed=3)
    cfg = GKDConfig(tokens=4 * 2 * 32, batch_size=2, lr=3e-3, checkpoint_every=2)
    first = train_gkd(parent, child, tokens, cfg, tmp_path)
    assert first["step"] == 4 and first["resumed_from"] == 0
    (ckpt,) = tmp_path.glob("checkpoint-*")
    assert (ckpt / "state.safetensors").exists()
    losses = [h["loss"] for h in first["history"]]
    assert losses[-1] < losses[0]
    # the same run again (from the same starting weights) resumes at its end and hands back the trained weights;
    # another budget starts afresh (the cosine schedule spans the budget): a smaller one must not hand back a model
    # trained past it, a larger one must not restart a decayed schedule
    def start():
        return assemble(parent, library, mixed_choice(library), bld_dir)[0]

    again_model = start()
    again = train_gkd(parent, again_model, tokens, cfg, tmp_path)
    assert again["resumed_from"] == 4 and again["step"] == 4
    for a, b in zip(child.parameters(), again_model.parameters()):
        assert torch.equal(a, b)
    for n in (3, 6):
        other = train_gkd(parent, start(), tokens, cfg.model_copy(update={"tokens": n * 2 * 32}), tmp_path)
        assert other["resumed_from"] == 0 and other["step"] == n
    other = train_gkd(parent, start(), tokens, cfg.model_copy(update={"lr": 1e-4, "tokens": 64}), tmp_path)
    assert other["resumed_from"] == 0  # other settings: afresh
    # the same shapes and settings from other starting weights (a retrained block, another pruning): afresh too
    moved = start()
    with torch.no_grad():
        moved.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    other = train_gkd(parent, moved, tokens, cfg, tmp_path)
    assert other["resumed_from"] == 0 and len(list(tmp_path.glob("checkpoint-*"))) == 5
    # deployable: Nemotron-NAS layout, reloads with the same outputs
    out = save(child, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["block_configs"][1]["ffn"]["no_op"]
    again = load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, child(tokens).logits)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, child(tokens).logits)
