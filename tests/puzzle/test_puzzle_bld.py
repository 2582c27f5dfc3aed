"""Blockwise local distillation: the loss, Puzzle's initialisations, training, resuming, the disk store."""

import pytest
import torch

from puzzle_helpers import BLD, tiny_tokens
from llmcompress.models import FFNConfig
from llmcompress.puzzle import normalized_mse, run_bld
from llmcompress.puzzle.bld import ActivationStore, capture, child_layer, cosine_lr, num_steps, read_block


def test_math():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert normalized_mse(t, t) == 0
    assert normalized_mse(torch.zeros_like(t), t) == pytest.approx(1.0)
    assert normalized_mse(2 * t, t) == pytest.approx(1.0)
    assert num_steps(1000, 4, 32) == 8 and num_steps(0, 4, 32) == 0 and num_steps(1, 4, 32) == 1
    assert cosine_lr(0, 10, 1.0, 0.1) == 1.0 and cosine_lr(9, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_capture_matches_the_parent(parent):
    tokens = tiny_tokens(4)
    store = ActivationStore()
    capture(parent, tokens, store, batch_size=3)
    with torch.no_grad():
        hidden = parent(tokens, output_hidden_states=True).hidden_states
    for i in range(len(parent.model.layers) + 1):
        torch.testing.assert_close(store.get(f"h{i}"), hidden[i])
    assert store.get("h1", 1, 3).shape == (2, 32, 64)


def test_parent_sized_child_is_the_parent(parent, library):
    layer = parent.model.layers[1]
    x = torch.randn(2, 32, 64)
    store = ActivationStore()
    capture(parent, tiny_tokens(2), store)
    cos, sin = store.get("rope_cos").expand(2, -1, -1), store.get("rope_sin").expand(2, -1, -1)
    with torch.no_grad():
        want = layer(x, cos, sin, None, None)
        att = child_layer(layer, parent.config, "attention", library.parent.attention)
        torch.testing.assert_close(att(x, cos, sin, None, None), want)
        # an FFN child keeping every channel (in importance order) computes the parent's FFN half
        ffn = child_layer(layer, parent.config, "ffn", FFNConfig(intermediate_size=128), library.channel_order[1])
        m = x + layer.self_attn(layer.input_layernorm(x), cos, sin, None, None)
        torch.testing.assert_close(ffn(m, cos, sin, None, None), want, rtol=1e-4, atol=1e-5)


def test_bld_reduces_nmse_and_resumes(parent, library, bld_dir):
    report = run_bld(parent, library, tiny_tokens(8, seed=1), BLD, bld_dir)
    assert report["trained"] == 0 and report["resumed"] == 3 * (2 + 3)  # 2 attention + 3 FFN variants per layer
    rows = report["blocks"]
    assert {r["variant"] for r in rows} == {"gqa_4q_1kv", "linear", "mlp_64", "mlp_32"}
    for r in rows:  # a few steps: clear gains where the initialisation is poor, no harm where it is close
        assert r["tokens"] >= BLD.tokens, r
        assert r["nmse"] < (0.9 if r["nmse_init"] > 0.05 else 1.05) * r["nmse_init"], r
    # an interrupted run: two blocks are missing; only they are trained again
    (bld_dir / "blocks" / "L001.ffn.linear.safetensors").unlink()
    (bld_dir / "blocks" / "L002.attention.gqa_4q_1kv.safetensors").unlink()
    again = run_bld(parent, library, tiny_tokens(8, seed=1), BLD, bld_dir)
    assert again["trained"] == 2 and again["resumed"] == 13
    assert read_block(bld_dir / "blocks" / "L001.ffn.linear.safetensors") is not None


def test_changed_settings_retrain_and_disk_store(parent, library, tmp_path):
    cfg = BLD.model_copy(update={"tokens": 64, "memory_limit_mb": 0})  # activations go to disk
    first = run_bld(parent, library, tiny_tokens(8, seed=1), cfg, tmp_path, layers=[0])
    assert first["store"].endswith("activations") and (tmp_path / "activations" / "h1.safetensors").exists()
    mem = run_bld(parent, library, tiny_tokens(8, seed=1), cfg.model_copy(update={"memory_limit_mb": 1e6}),
                  tmp_path / "mem", layers=[0])
    assert [r["nmse"] for r in first["blocks"]] == pytest.approx([r["nmse"] for r in mem["blocks"]], rel=1e-4)
    changed = run_bld(parent, library, tiny_tokens(8, seed=1), cfg.model_copy(update={"lr": 1e-4}), tmp_path,
                      layers=[0])
    assert changed["trained"] == 5 and changed["resumed"] == 0
    with pytest.raises(ValueError, match="num_samples"):
        run_bld(parent, library, tiny_tokens(6), cfg, tmp_path)


def test_pool_worker_rebuilds_the_same_block(parent, library, tmp_path):
    # what a process-pool worker runs, called in-process: same block as the single-process path
    from llmcompress.puzzle.bld import ActivationStore, _pool_job, jobs_for, train_block

    cfg = BLD.model_copy(update={"tokens": 64})
    store = ActivationStore(tmp_path / "activations")
    capture(parent, tiny_tokens(8, seed=1), store)
    job = jobs_for(library, cfg, tmp_path, 32, layers=[2])[0]
    row = _pool_job(job, parent.model.layers[2].state_dict(), parent.config.to_dict(), parent.config.block_configs[2],
                    str(store.folder), cfg.model_dump(), "cpu", 1)
    import copy

    again = train_block(job, copy.deepcopy(parent.model.layers[2]), parent.config, store, cfg)
    assert row["nmse"] == pytest.approx(again["nmse"], rel=1e-5) and row["variant"] == "gqa_4q_1kv"
