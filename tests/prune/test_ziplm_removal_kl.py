"""ZipLM `error_scale: removal_kl`: each part's OBS error curve rescaled to the dense model's KL without that part."""

import pytest
import torch
from pydantic import ValidationError

from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, blocks, set_block
from llmcompress.prune import ziplm_family
from llmcompress.prune.database import build_database, part_errors
from llmcompress.prune.search import KnapsackDP
from llmcompress.prune.sensitivity import KLProbe
from llmcompress.prune.ziplm_family import ZipLMConfig, prune_family, removal_kl, scale_to_removal
from llmcompress.puzzle.gkd import copy_graph


@pytest.fixture(scope="module")
def tiny_db(tiny):
    g, tokens = tiny
    return g, tokens, build_database(g, tokens)


def test_scale_to_removal_pins_the_removed_level_and_keeps_the_curve_shape():
    errors = [[0.0, 0.2, 0.5, 1.0], [0.0, 3.0, 6.0], [0.0, 0.0]]
    kl = [0.4, 0.05, 7.0]
    out = scale_to_removal(errors, kl)
    assert out[0] == pytest.approx([0.0, 0.08, 0.2, 0.4])
    assert out[1] == pytest.approx([0.0, 0.025, 0.05])
    assert out[2] == [0.0, 0.0]  # a part whose removal changes nothing stays free


def test_any_normalisation_cancels(tiny_db):
    _, _, db = tiny_db
    kl = [0.1 * (p + 1) for p in range(2 * len(db.layers))]
    scaled = [scale_to_removal(part_errors(db, n), kl) for n in ("output", "residual", "none")]
    for other in scaled[1:]:
        for a, b in zip(scaled[0], other):
            assert a == pytest.approx(b, rel=1e-6)
    assert [es[-1] for es in scaled[0]] == pytest.approx(kl)


def test_removal_kl_is_the_kl_of_the_dense_model_without_each_part(tiny_db):
    g, tokens, db = tiny_db
    probe = KLProbe(g, tokens[:4], positions=8, batch_size=4)
    seen = []
    kl = removal_kl(g, db, probe, progress=lambda label, done, total: seen.append((done, total)))
    n = len(db.layers)
    assert len(kl) == 2 * n and seen[-1] == (2 * n, 2 * n)
    parent = blocks(g)
    for i in (0, n - 1):  # built here without the database: the layer's part replaced by a no-op
        for p, block in ((0, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=parent[i].ffn)),
                         (1, BlockConfig(attention=parent[i].attention, ffn=FFNConfig(kind="noop")))):
            m = copy_graph(g)
            set_block(m, i, block)
            assert kl[2 * i + p] == pytest.approx(probe(m.eval()), rel=1e-5)
    assert all(k > 0 for k in kl)
    # against another reference (gradual mode: a pruned model probed against the dense one) it is the growth
    other = copy_graph(g)
    with torch.no_grad():
        for w in other.parameters():
            w.add_(0.02 * torch.randn_like(w))
    far = KLProbe(other.eval(), tokens[:4], positions=8, batch_size=4)
    grown = removal_kl(g, db, far)
    m = copy_graph(g)
    set_block(m, 0, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=parent[0].ffn))
    assert far(g) > 0 and grown[0] == pytest.approx(max(far(m.eval()) - far(g), 0.0), rel=1e-5, abs=1e-7)


def test_family_minimises_the_scaled_errors_and_records_them(tiny_db, monkeypatch):
    from llmcompress.hardware.cost_model import CostModel
    from llmcompress.hardware.profile import profile

    g, tokens, db = tiny_db
    cm = CostModel(profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5))
    n = len(db.layers)
    # removing any attention block is nearly free and any FFN cut is dear: the DP must spend the whole budget on
    # attention, which the plain output-normalised errors (1.0 for either part removed) would not single out
    fake = [1e-4 if p % 2 == 0 else 10.0 for p in range(2 * n)]
    monkeypatch.setattr(ziplm_family, "removal_kl", lambda graph, db, probe, progress=None: list(fake))
    cfg = ZipLMConfig(speedups=[1.05], num_samples=8, seq_len=32, refine=0, sequential=False,
                      error_scale="removal_kl", search_samples=4, search_seq_len=32, search_positions=8)
    row = prune_family(g, db, cm, cfg, tokens, measure=False)[0]
    assert row["removal_kl"] == fake
    costs, constant = ziplm_family.part_costs(db, g.config, cm, "decode", 1)
    errors = scale_to_removal(part_errors(db, cfg.normalise), fake)
    budget = (constant + sum(c[0] for c in costs)) / 1.05 - constant
    best = KnapsackDP(costs, errors, cfg.buckets).solve(budget)
    assert row["error"] == pytest.approx(best.error)
    assert all(f == max(db.layers[i].ffn) for i, (_, f) in enumerate(row["choice"]))  # no FFN touched
    assert any(a < max(db.layers[i].attn) for i, (a, _) in enumerate(row["choice"]))


def test_removal_kl_needs_tokens_and_a_known_name(tiny_db):
    from llmcompress.hardware.cost_model import CostModel
    from llmcompress.hardware.profile import profile

    g, _, db = tiny_db
    cm = CostModel(profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5))
    with pytest.raises(ValueError, match="calibration tokens"):
        prune_family(g, db, cm, ZipLMConfig(speedups=[1.1], refine=0, error_scale="removal_kl"), None,
                     measure=False)
    with pytest.raises(ValidationError):
        ZipLMConfig(error_scale="kl")
