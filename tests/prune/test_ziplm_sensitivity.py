"""ZipLM sensitivity search: weights on the DP's errors tuned on the real loss, never worse than the plain DP."""

import itertools

import pytest
import torch
from pydantic import ValidationError

from llmcompress.prune.search import KnapsackDP
from llmcompress.prune.sensitivity import KLProbe, sensitivity_search, torch_threads, weighted
from llmcompress.prune.ziplm_family import ZipLMConfig, prune_family


def _instance(parts=5, options=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    costs = [sorted(torch.rand(options, generator=g).tolist(), reverse=True) for _ in range(parts)]
    errors = [sorted(torch.rand(options, generator=g).tolist()) for _ in range(parts)]  # cheaper -> worse
    return costs, errors


def _true_loss(errors, sensitivity):
    """A 'real' loss the summed errors mis-weight: part p's errors count sensitivity[p] times."""
    return lambda choice: sum(s * errors[p][o] for p, (o, s) in enumerate(zip(choice, sensitivity)))


def test_search_finds_the_true_optimum_the_plain_dp_misses():
    costs, errors = _instance()
    sensitivity = [8.0, 0.2, 1.0, 0.2, 4.0]
    budget = 0.5 * sum(c[0] for c in costs)
    loss = _true_loss(errors, sensitivity)
    feasible = [ch for ch in itertools.product(*(range(4) for _ in costs))
                if sum(costs[p][o] for p, o in enumerate(ch)) <= budget]
    best = min(loss(ch) for ch in feasible)
    plain = KnapsackDP(costs, errors).solve(budget).choice
    assert loss(plain) > best * 1.05  # the instance is one where the summed errors mislead

    calls = []
    res = sensitivity_search(costs, errors, budget, lambda ch: calls.append(ch) or loss(ch), steps=150, spread=10.0,
                             mutate=0.4, seed=0)
    assert res["start_loss"] == pytest.approx(loss(plain))
    assert res["loss"] == pytest.approx(best)
    assert res["loss"] == pytest.approx(loss(res["choice"]))
    assert sum(costs[p][o] for p, o in enumerate(res["choice"])) <= budget
    # the DP under the returned weights gives the returned choice; each choice was evaluated once
    assert KnapsackDP(costs, weighted(errors, res["weights"])).solve(budget).choice == res["choice"]
    assert len(calls) == len({tuple(c) for c in calls}) == res["evaluations"]
    losses = [h[1] for h in res["history"]]
    assert all(b <= a for a, b in zip(losses, losses[1:])) and len(losses) == 151


def test_zero_steps_is_the_plain_dp_and_bad_settings_are_rejected():
    costs, errors = _instance(seed=1)
    budget = 0.6 * sum(c[0] for c in costs)
    res = sensitivity_search(costs, errors, budget, lambda ch: float(sum(ch)), steps=0)
    assert res["choice"] == KnapsackDP(costs, errors).solve(budget).choice
    assert res["weights"] == [1.0] * len(costs) and res["evaluations"] == 1
    for bad in (dict(steps=-1), dict(spread=0.5), dict(mutate=0.0)):
        with pytest.raises(ValueError):
            sensitivity_search(costs, errors, budget, lambda ch: 0.0, **bad)
    with pytest.raises(ValidationError):
        ZipLMConfig(search_mutate=0)


def test_kl_probe_matches_the_direct_kl_and_is_zero_for_the_reference(tiny):
    g, tokens = tiny
    probe = KLProbe(g, tokens, positions=8, batch_size=3)
    assert probe(g) == pytest.approx(0.0, abs=1e-6)
    other = type(g)(g.config)
    other.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in g.state_dict().items()})
    other.eval()
    with torch.no_grad():
        t = g(tokens).logits[:, -8:].float().log_softmax(-1)
        s = other(tokens).logits[:, -8:].float().log_softmax(-1)
    direct = (t.exp() * (t - s)).sum(-1).mean().item()
    assert probe(other) == pytest.approx(direct, rel=1e-4)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_family_with_search_is_no_worse_than_the_plain_dp_and_meets_the_budget(tiny):
    from llmcompress.hardware.cost_model import CostModel
    from llmcompress.hardware.profile import profile
    from llmcompress.prune.database import build_database, part_errors, realise
    from llmcompress.prune.ziplm_family import layer_choice

    g, tokens = tiny
    cm = CostModel(profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5))
    db = build_database(g, tokens)
    base = dict(speedups=[1.3], num_samples=8, seq_len=32, refine=0, sequential=False)
    plain = prune_family(g, db, cm, ZipLMConfig(**base), tokens, measure=False)[0]
    cfg = ZipLMConfig(**base, search_steps=12, search_samples=4, search_seq_len=32, search_positions=16,
                      search_spread=4.0, search_mutate=0.5)
    row = prune_family(g, db, cm, cfg, tokens, measure=False)[0]
    s = row["search"]
    probe = KLProbe(g, tokens[:4], positions=16, batch_size=cfg.batch_size)
    assert s["start_loss"] == pytest.approx(probe(plain["model"]), rel=1e-5)
    assert s["loss"] == pytest.approx(probe(row["model"]), rel=1e-5) and s["loss"] <= s["start_loss"]
    assert s["evaluations"] <= 13 and len(s["weights"]) == 2 * len(db.layers)
    dense = cm.predict(g)["decode_ms_per_token"]
    assert dense / cm.predict(row["model"])["decode_ms_per_token"] >= 1.3 * (1 - 1e-6)
    errors = part_errors(db, cfg.normalise)  # the reported error is the database's, not the weighted one
    attn, ffn = db.levels("attn"), db.levels("ffn")
    flat = [o for i, (a, f) in enumerate(row["choice"]) for o in (attn[i].index(a), ffn[i].index(f))]
    assert row["error"] == pytest.approx(sum(errors[p][o] for p, o in enumerate(flat)))
    assert layer_choice(db, flat) == row["choice"]
    assert realise(g, db, row["choice"]) is not None
