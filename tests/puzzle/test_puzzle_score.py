"""Replace-1-block scoring and the scored library file."""

import pytest
import torch

from puzzle_helpers import one_thread, tiny_tokens
from llmcompress.hardware import CostModel, profile
from llmcompress.models import BlockConfig
from llmcompress.prune.layers import kl_div
from llmcompress.puzzle import ScoreConfig, assemble, load_library, save_library, score_blocks, scored_library
from llmcompress.puzzle.score import block_of, lm_loss, pair_scores


@pytest.fixture(scope="module")
def scores(parent, library, bld_dir):
    with one_thread():
        return score_blocks(parent, library, tiny_tokens(4, seed=2), ScoreConfig(num_samples=4, pairs=True), bld_dir)


@pytest.fixture(scope="module")
def table(parent):
    with one_thread():
        return profile(parent, batches=[1, 2], prompt_len=16, gen_len=4, ffn_fractions=[1, 0.5, 0.25], repeats=1,
                   warmup=0, working_set_mb=0.1)


def test_parent_scores_zero_and_others_positive(scores, library):
    for layer in range(library.num_layers):
        assert scores["attention"][layer][0] == 0 and scores["ffn"][layer][0] == 0
        assert min(scores["attention"][layer][1:]) > 0 and min(scores["ffn"][layer][1:]) > 0
        assert scores["pairs"][layer][0][0] == 0
        assert all(scores["trained"]["attention"][layer]) and all(scores["trained"]["ffn"][layer])
    # a pair with the parent FFN is the attention variant alone
    assert [row[0] for row in scores["pairs"][1]] == pytest.approx(scores["attention"][1], abs=1e-6)
    assert "replace-1-block KL" in scores["protocol"]


def test_score_is_the_kl_of_the_replaced_model(parent, library, bld_dir, scores):
    choice = [library.parent] * 3
    choice[1] = BlockConfig(attention=library.attention[1], ffn=library.parent.ffn)
    child, rows = assemble(parent, library, choice, bld_dir)
    assert rows[1]["trained"] == {"attention": True}
    tokens = tiny_tokens(4, seed=2)
    with torch.no_grad():
        kl = kl_div(parent(tokens).logits, child(tokens).logits).item()
    assert scores["attention"][1][1] == pytest.approx(kl, rel=1e-4)


def test_lm_loss_metric(parent, library):
    s = score_blocks(parent, library, tiny_tokens(2, seed=2), ScoreConfig(metric="lm_loss", positions=8,
                                                                             batch_size=2))
    assert s["ffn"][0][0] == 0 and not any(s["trained"]["ffn"][0][1:-1])  # no BLD folder: initialisations
    ids = torch.arange(12).view(1, 12)
    logits = torch.zeros(1, 4, 20)
    assert lm_loss(logits, ids) == pytest.approx(torch.log(torch.tensor(20.0)).item())


def test_scored_library_file(library, scores, table, tmp_path):
    lib = scored_library(library, scores, table)
    path = save_library(lib, tmp_path / "scored.json")
    again = load_library(path)
    assert len(again["layers"]) == 3 and len(again["layers"][0]["blocks"]) == len(library.attention) * len(library.ffn)
    block = block_of(again, "gqa_4q_1kv+mlp_64")
    assert block == BlockConfig(attention=library.attention[1], ffn=library.ffn[1])
    want = CostModel(table).layer_costs([(block, "dense", "dense")], 2)[0]
    got = again["costs"]["gqa_4q_1kv+mlp_64"]
    assert got["decode_ms"]["2"] == pytest.approx(want["decode_ms"]) and got["params"] == want["params"]
    assert again["layers"][2]["blocks"][0]["score"] == 0
    assert pair_scores([0.0, 1.0], [0.0, 0.5]) == [[0.0, 0.5], [1.0, 1.5]]
    with pytest.raises(ValueError, match="run the puzzle_score stage"):
        load_library(tmp_path / "missing.json")
