"""ZipLM gradual mode: databases on already-pruned models, nested targets with distillation in between."""

import json

import pytest
import torch
from _tiny import cli

from llmcompress.hardware.cost_model import CostModel
from llmcompress.hardware.profile import profile, save_table
from llmcompress.models import load
from llmcompress.models.graph import blocks
from llmcompress.prune.database import build_database, load_database, realise, widths
from llmcompress.prune.ziplm_family import ZipLMConfig, prune_gradual
from llmcompress.puzzle.gkd import GKDConfig, gkd_loss, normalised_mse


def test_database_of_a_pruned_model(tiny, tmp_path):
    g, tokens = tiny
    pruned = realise(g, build_database(g, tokens), [(1, 64), (0, 32), (2, 0), (1, 96)])
    assert widths(pruned) == [(1, 64), (0, 32), (2, 0), (1, 96)]
    db = build_database(pruned, tokens, folder=tmp_path / "db")
    # each layer's levels: the search's sizes up to its current width
    assert db.levels("attn") == [[1, 0], [0], [2, 1, 0], [1, 0]]
    assert db.levels("ffn") == [[64, 32, 0], [32, 0], [0], [96, 64, 32, 0]]
    assert all(e.attn[max(e.attn)].error == 0 and e.ffn[max(e.ffn)].error == 0 for e in db.layers)
    same = realise(pruned, db, widths(pruned))
    assert torch.equal(same(tokens).logits, pruned(tokens).logits)
    again = load_database(tmp_path / "db")  # resumable, removed parts included
    assert again.levels("ffn") == db.levels("ffn") and again.layers[1].attn[0].weight.shape[1] == 0
    further = [(0, 32), (0, 0), (1, 0), (1, 64)]
    for tok in (None, tokens):  # quick and sequential realisation
        smaller = realise(pruned, db, further, tok)
        assert widths(smaller) == further
        assert torch.isfinite(smaller(tokens).logits).all()
    with pytest.raises(ValueError, match="other settings"):  # another model's database in the same folder
        build_database(g, tokens, folder=tmp_path / "db")


def test_normalised_mse_part_of_the_gkd_loss():
    torch.manual_seed(0)
    h = [torch.randn(2, 3, 4) for _ in range(3)]
    logits = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    cfg = GKDConfig(cosine_weight=0, mse_weight=1, kl_weight=0)
    loss, parts = gkd_loss(h, h, logits, logits, ids, cfg)
    assert loss.item() == 0 and parts == {"mse": 0.0}
    a, b = h[1], 0.5 * h[1]
    assert normalised_mse(a, b).item() == pytest.approx(0.25)  # ||a/2||² / ||a||²


def test_gradual_targets_are_nested_distilled_and_meet_their_budgets(tiny, tmp_path):
    g, tokens = tiny
    table = profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5)
    cm = CostModel(table)
    cfg = ZipLMConfig(speedups=[1.2, 1.5], num_samples=8, seq_len=32, refine=0, gradual=True, gradual_tokens=128,
                      gradual_batch=2, gradual_lr=1e-3)
    rows = prune_gradual(g, tokens, cm, cfg, tokens, folder=tmp_path, measure=False)
    dense = cm.predict(g)["decode_ms_per_token"]
    assert [r["target_speedup"] for r in rows] == [1.2, 1.5]
    for r in rows:
        got = cm.predict(r["model"])["decode_ms_per_token"]
        assert dense / got >= r["target_speedup"] * (1 - 1e-6)  # speed-ups relative to the dense model
        assert r["distillation"]["steps"] == 2 and r["distillation"]["loss_last"] is not None
    first, second = (widths(r["model"]) for r in rows)
    assert all(a2 <= a1 and f2 <= f1 for (a1, f1), (a2, f2) in zip(first, second))  # pruned from the first
    assert (tmp_path / "database").exists() and (tmp_path / "gradual-1-1.5" / "database").exists()
    # distillation moved the weights: the first model differs from its one-shot realisation
    one_shot = realise(g, build_database(g, tokens), rows[0]["choice"], tokens)
    diff = [not torch.equal(p, q) for p, q in zip(one_shot.parameters(), rows[0]["model"].parameters())]
    assert any(diff)


def test_gradual_cli(tiny_hf_dir, corpus_file, tmp_path):
    g = load(str(tiny_hf_dir))
    t = profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5,
                ffn_fractions=[1, 2 / 3, 1 / 3])
    save_table(t, tmp_path / "table.json")
    out = tmp_path / "z"
    r = cli("prune", tiny_hf_dir, "--method", "ziplm", "--speedups", "1.1,1.3", "--cost-table", tmp_path / "table.json",
            "--data", corpus_file, "--heldout-rows", 10, "--num-samples", 4, "--seq-len", 16, "--refine", 0,
            "--gradual", "--gradual-tokens", 64, "--out", out)
    assert r.exit_code == 0, r.output
    assert "gradual" in r.output
    report = json.loads((out / "report.json").read_text())
    assert [m["distillation"]["tokens"] for m in report["models"]] == [64, 64]
    for m in report["models"]:
        assert [b.describe() for b in blocks(load(m["checkpoint"]))] == [
            ("noop" if a == 0 else f"gqa {2 * a}q/{a}kv") + " | " + ("noop" if f == 0 else f"mlp {f}")
            for a, f in m["choice"]]
