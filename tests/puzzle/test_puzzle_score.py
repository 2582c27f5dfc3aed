"""Replace-1-block scoring and the scored library file."""

import pytest
import torch

from puzzle_helpers import one_thread, tiny_tokens
from llmcompress.hardware import CostModel, profile
from llmcompress.models import BlockConfig
from llmcompress.prune.layers import kl_div
from llmcompress.puzzle import ScoreConfig, assemble, load_library, save_library, score_blocks, scored_library
from llmcompress.puzzle.context import search_in_context
from llmcompress.puzzle.library import variant_name
from llmcompress.puzzle.mip import Budgets, search
from llmcompress.puzzle.score import (block_of, context_matrix, lm_loss, model_score, pair_scores,
                                     score_in_context)


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


def test_in_context_scores_around_the_parent_are_the_replace_1_block_scores(parent, library, bld_dir, scores):
    choice = [library.parent] * 3
    model, _ = assemble(parent, library, choice, bld_dir)
    ctx = score_in_context(parent, model, library, choice, tiny_tokens(4, seed=2), ScoreConfig(num_samples=4),
                           bld_dir)
    assert ctx["base"] == pytest.approx(0, abs=1e-6)
    for part in ("attention", "ffn"):
        for layer in range(3):
            assert ctx[part][layer] == pytest.approx(scores[part][layer], rel=1e-4, abs=1e-6)
    assert "in-context swap" in ctx["protocol"]


def test_in_context_score_is_the_kl_change_of_the_swap(parent, library, bld_dir):
    a1, f1, f2 = library.attention[1], library.ffn[1], library.ffn[2]
    choice = [BlockConfig(attention=a1, ffn=library.parent.ffn), BlockConfig(attention=library.parent.attention,
                                                                                ffn=f1), library.parent]
    model, _ = assemble(parent, library, choice, bld_dir)
    tokens, cfg = tiny_tokens(4, seed=3), ScoreConfig(num_samples=4, positions=16, batch_size=2)
    ctx = score_in_context(parent, model, library, choice, tokens, cfg, bld_dir)
    base = model_score(parent, model, tokens, cfg)
    assert ctx["base"] == pytest.approx(base, rel=1e-4) and base > 0
    assert ctx["attention"][0][1] == 0 and ctx["ffn"][1][1] == 0  # the chosen parts
    # layer 1's FFN f1 -> f2 with layer 0's attention variant still in place
    swapped = list(choice)
    swapped[1] = BlockConfig(attention=library.parent.attention, ffn=f2)
    other, _ = assemble(parent, library, swapped, bld_dir)
    assert ctx["ffn"][1][2] == pytest.approx(model_score(parent, other, tokens, cfg) - base, rel=1e-3, abs=1e-6)
    # undoing layer 0's attention swap: the parent's attention there
    undone = list(choice)
    undone[0] = library.parent
    back, _ = assemble(parent, library, undone, bld_dir)
    assert ctx["attention"][0][0] == pytest.approx(model_score(parent, back, tokens, cfg) - base, rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="2 blocks given"):
        score_in_context(parent, model, library, choice[:2], tokens, cfg, bld_dir)


def test_context_matrix_sums_the_parts(library, scores, table):
    lib = scored_library(library, scores, table)
    ctx = {"attention": [[0.5 * k for k in range(len(library.attention))]] * 3,
           "ffn": [[10.0 * k for k in range(len(library.ffn))]] * 3}
    m = context_matrix(lib, ctx)
    names = [b["name"] for b in lib["layers"][0]["blocks"]]
    assert len(m) == 3 and len(m[0]) == len(library.attention) * len(library.ffn)
    for name, value in zip(names, m[2]):
        a, f = name.split("+")
        ka = [variant_name(v) for v in library.attention].index(a)
        kf = [variant_name(v) for v in library.ffn].index(f)
        assert value == 0.5 * ka + 10.0 * kf


def test_search_in_context_keeps_only_a_lower_kl_within_the_trust_region(parent, library, bld_dir, scores, table):
    lib = scored_library(library, scores, table)
    budgets = Budgets(target_speedup=1.3)
    found = search(lib, budgets)
    start = found | {"solutions": [found["uniform"]]}  # the same block everywhere: room to improve
    tokens, cfg = tiny_tokens(4, seed=5), ScoreConfig(num_samples=4, positions=16, batch_size=2)
    result, model = search_in_context(parent, library, lib, budgets, start, tokens, cfg, bld_dir, rounds=3,
                                      max_changed=[2, 1])
    rounds = result["context"]["rounds"]
    first = [block_of(lib, n) for n in start["solutions"][0]["blocks"]]
    assert rounds[0]["kl"] == pytest.approx(model_score(parent, assemble(parent, library, first, bld_dir)[0],
                                                        tokens, cfg), rel=1e-4)
    final = result["solutions"][0]
    assert final["predicted_speedup"]["decode"] >= 1.3 - 1e-9
    assert model_score(parent, model, tokens, cfg) == pytest.approx(
        min([rounds[-1]["kl"]] + [c["kl"] for c in rounds[-1]["candidates"]]), rel=1e-4)
    for r, nxt in zip(rounds, rounds[1:]):  # a kept candidate starts the next round
        assert r["kept"] is not None and nxt["kl"] == pytest.approx(min(c["kl"] for c in r["candidates"]), rel=1e-4)
    assert all(c["changed_layers"] <= c["max_changed"] for r in rounds for c in r["candidates"])
    assert rounds[-1]["kept"] is None or len(rounds) == 3
    if all(r["kept"] is None for r in rounds):
        assert final["blocks"] == start["solutions"][0]["blocks"]
    with pytest.raises(ValueError, match="must be >= 1"):
        search_in_context(parent, library, lib, budgets, start, tokens, cfg, bld_dir, rounds=1, max_changed=[0])
