"""MIP search: the two back-ends agree, match brute force, report infeasibility, honour diversity; baselines."""

import itertools
import random

import pytest

from llmcompress.puzzle.mip import (BACKENDS, Budget, Budgets, feasible, greedy, make_budgets, search, solve,
                                   table_bias, uniform)


def instance(seed: int, layers: int, variants: int, n_budgets: int = 2, tightness: float = 0.6):
    rng = random.Random(seed)
    scores = [[0.0] + [rng.random() for _ in range(variants - 1)] for _ in range(layers)]
    budgets = []
    for k in range(n_budgets):
        costs = [[1.0] + [rng.uniform(0.05, 1.0) for _ in range(variants - 1)] for _ in range(layers)]
        budgets.append(Budget(f"cost{k}", costs, rng.uniform(0, 0.5), 0.0, "ms"))
        budgets[-1].limit = budgets[-1].offset + tightness * layers
    return scores, budgets


def brute_force(scores, budgets):
    best = None
    for choice in itertools.product(*[range(len(s)) for s in scores]):
        if feasible(choice, budgets):
            obj = sum(scores[l][v] for l, v in enumerate(choice))
            if best is None or obj < best[0] - 1e-12:
                best = (obj, list(choice))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2])
def test_trust_region_matches_brute_force(seed, k):
    scores, budgets = instance(seed + 10, layers=4, variants=3, n_budgets=2, tightness=0.8)
    start = brute_force(scores, budgets)
    if start is None:
        pytest.skip("infeasible instance")
    near = start[1]
    rng = random.Random(seed)
    other = [[rng.uniform(-1, 1) for _ in s] for s in scores]  # e.g. in-context changes
    region = [c for c in itertools.product(*[range(len(s)) for s in scores])
              if sum(a != b for a, b in zip(c, near)) <= k]
    want = brute_force(other, budgets + [Budget("region", [[0.0 if v == near[l] else 1.0 for v in range(3)]
                                                           for l in range(4)], 0.0, float(k))])
    for backend in BACKENDS:
        (sol,) = solve(other, budgets, backend, near=near, max_changed=k)
        assert tuple(sol.choice) in region and feasible(sol.choice, budgets)
        assert sol.objective == pytest.approx(want[0], abs=1e-9)
    with pytest.raises(ValueError, match="together"):
        solve(other, budgets, near=near)


@pytest.mark.parametrize("seed", range(6))
def test_backends_match_brute_force(seed):
    scores, budgets = instance(seed, layers=4, variants=4, n_budgets=1 + seed % 3)
    want = brute_force(scores, budgets)
    for backend in BACKENDS:
        if want is None:
            with pytest.raises(ValueError):
                solve(scores, budgets, backend)
            continue
        (sol,) = solve(scores, budgets, backend)
        assert sol.optimal and feasible(sol.choice, budgets)
        assert sol.objective == pytest.approx(want[0], abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_backends_agree_on_larger_instances(seed):
    scores, budgets = instance(100 + seed, layers=16, variants=8, n_budgets=3, tightness=0.45)
    a = solve(scores, budgets, "ortools", num_solutions=2, max_shared=0.75)
    b = solve(scores, budgets, "pulp", num_solutions=2, max_shared=0.75)
    assert a[0].objective == pytest.approx(b[0].objective, abs=1e-7)
    assert [s.objective for s in a] == pytest.approx([s.objective for s in b], abs=1e-7)
    # the MIP is never worse than the baselines
    g = greedy(scores, budgets)
    assert feasible(g, budgets) and a[0].objective <= sum(scores[l][v] for l, v in enumerate(g)) + 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_diversity(backend):
    scores, budgets = instance(7, layers=10, variants=5, n_budgets=1, tightness=0.8)
    sols = solve(scores, budgets, backend, num_solutions=4, max_shared=0.5)
    assert len(sols) == 4
    for i, s in enumerate(sols):
        assert feasible(s.choice, budgets)
        for prev in sols[:i]:
            assert sum(a == b for a, b in zip(s.choice, prev.choice)) <= 5
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)
    # max_shared = 1 still asks for a different model each time
    again = solve(scores, budgets, backend, num_solutions=2, max_shared=1.0)
    assert again[0].choice != again[1].choice


@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_budget_names_the_tightest(backend):
    scores = [[0.0, 1.0, 2.0]] * 3
    lat = Budget("decode_ms (batch 1)", [[3.0, 2.0, 1.0]] * 3, 0.5, 2.0, "ms")
    with pytest.raises(ValueError, match=r"decode_ms \(batch 1\) <= 2 ms: tightest feasible 3.5 ms"):
        solve(scores, [lat], backend)
    # with a second budget kept the tightest latency is higher: params <= 7 allows at most one 1-ms variant
    # (params 1 + 2 + 4 or 2 + 2 + 2: 6 ms + 0.5)
    params = Budget("params", [[1.0, 2.0, 4.0]] * 3, 0.0, 7.0)
    with pytest.raises(ValueError, match=r"tightest feasible 6.5 ms \(with the other budgets kept\)"):
        solve(scores, [lat, params], backend)
    tput = Budget("throughput (batch 1)", [[3.0, 2.0, 1.0]] * 3, 0.5, 1000 / 500, "tokens/s", invert=1000)
    with pytest.raises(ValueError, match=r"throughput \(batch 1\) >= 500 tokens/s: tightest feasible 285.714"):
        solve(scores, [tput], backend)


def test_baselines():
    names = [["parent", "half", "noop"]] * 4
    scores = [[0.0, 0.1, 1.0], [0.0, 0.2, 0.3], [0.0, 0.1, 5.0], [0.0, 0.4, 0.5]]
    lat = Budget("lat", [[2.0, 1.0, 0.0]] * 4, 0.0, 5.0)
    g = greedy(scores, [lat])
    # cheapest score per ms saved first: layer 0 half (0.1/ms), layer 2 half (0.1/ms), layer 1 noop (0.15/ms)
    assert g == [1, 2, 1, 0] and feasible(g, [lat])
    (best,) = solve(scores, [lat])
    assert best.objective == pytest.approx(0.4)  # the MIP beats greedy (0.5)
    assert uniform(names, scores, [lat]) == [1, 1, 1, 1]
    assert uniform(names, scores, [Budget("lat", [[2.0, 1.0, 0.0]] * 4, 0.0, 3.5)]) == [2, 2, 2, 2]
    assert uniform(names, scores, [Budget("lat", [[2.0, 1.0, 0.0]] * 4, 1.0, 0.5)]) is None
    with pytest.raises(ValueError, match="greedy search cannot meet"):
        greedy(scores, [Budget("lat", [[2.0, 1.0, 0.0]] * 4, 1.0, 0.5)])


def fake_library(layers: int = 3) -> dict:
    blocks = {"gqa_4q_2kv+mlp_128": (2.0, 1.0, 1000, 64), "gqa_4q_2kv+mlp_64": (1.5, 0.8, 700, 64),
              "noop+noop": (0.1, 0.05, 0, 0)}
    costs = {n: {"prefill_ms": {"1": p, "8": 4 * p}, "decode_ms": {"1": d, "8": 2 * d}, "params": w,
                 "param_bytes": 4 * w, "kv_bytes_per_token": kv} for n, (p, d, w, kv) in blocks.items()}
    score = {"gqa_4q_2kv+mlp_128": 0.0, "gqa_4q_2kv+mlp_64": 0.1, "noop+noop": 1.0}
    return {
        "parent": {"attention": {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2},
                   "ffn": {"kind": "mlp", "intermediate_size": 128}},
        "cost_table": {"batches": [1, 8], "prompt_len": 16, "gen_len": 4},
        "head": {"prefill_ms": {"1": 1.0, "8": 4.0}, "decode_ms": {"1": 0.5, "8": 1.0}, "params": 500,
                 "param_bytes": 2000, "kv_bytes_per_token": 0},
        "costs": costs,
        "layers": [{"blocks": [{"name": n, "score": score[n] * (1 + l)} for n in blocks]} for l in range(layers)],
    }


def test_budgets_from_library():
    lib = fake_library()
    rows = make_budgets(lib, Budgets(target_speedup=1.5, throughput_tok_s=2000, throughput_batch=8, memory_mb=1,
                                     memory_batch=2, params=10_000))
    assert [r.name for r in rows] == ["decode_ms (batch 1)", "throughput (batch 8)",
                                      "memory (batch 2 x 20 tokens)", "params"]
    parent = [0] * 3
    assert rows[0].limit == pytest.approx((0.5 + 3 * 1.0) / 1.5)
    assert rows[1].user(rows[1].total(parent)) == pytest.approx(8000 / (1.0 + 3 * 2.0))
    assert rows[2].total(parent) == 2000 + 3 * (4000 + 64 * 2 * 20)
    assert rows[3].total(parent) == 500 + 3000
    result = search(lib, Budgets(target_speedup=1.5), num_solutions=2, max_shared=0.67)
    best = result["solutions"][0]
    assert best["predicted_speedup"]["decode"] >= 1.5 - 1e-9
    # decode budget (0.5 + 3 x 1.0) / 1.5 = 2.33 ms: drop layer 0 (its score is lowest) and halve the other FFNs
    assert best["blocks"] == ["noop+noop", "gqa_4q_2kv+mlp_64", "gqa_4q_2kv+mlp_64"]
    assert result["uniform"]["block"] == "noop+noop" and result["greedy"]["score"] >= best["score"]
    # an objective (e.g. in-context scores) steers the MIP only; scores and baselines stay the library's
    steer = [[0.0, 5.0, -1.0], [0.0, -1.0, 5.0], [0.0, -1.0, 5.0]]
    other = search(lib, Budgets(target_speedup=1.5), objective=steer)["solutions"][0]
    assert other["blocks"] == best["blocks"] and other["objective"] == -3.0 and other["score"] == best["score"]
    steer = [[0.0, -1.0, 5.0], [0.0, -1.0, 5.0], [0.0, -1.0, -2.0]]  # now the no-op is best in layer 2
    moved = search(lib, Budgets(target_speedup=1.5), objective=steer)
    assert moved["solutions"][0]["blocks"] == ["gqa_4q_2kv+mlp_64", "gqa_4q_2kv+mlp_64", "noop+noop"]
    assert moved["solutions"][0]["objective"] == -4.0 and moved["greedy"] == result["greedy"]
    with pytest.raises(ValueError, match="one value per"):
        search(lib, Budgets(target_speedup=1.5), objective=[[0.0]] * 3)
    with pytest.raises(ValueError, match="batch 4 was not profiled|throughput_batch 4 was not profiled"):
        make_budgets(lib, Budgets(throughput_tok_s=10, throughput_batch=4))
    with pytest.raises(ValueError, match="at least one budget"):
        Budgets()


def test_table_bias_is_the_geometric_mean_of_measured_over_predicted():
    assert table_bias([1.5], [1.35]) == pytest.approx(0.9)
    assert table_bias([1.5, 1.6], [1.35, 1.76]) == pytest.approx((0.9 * 1.1) ** 0.5)
    with pytest.raises(ValueError, match="as many measured"):
        table_bias([1.5, 1.6], [1.35])


def test_refinement_pools_the_bias_and_keeps_the_last_search_untimed(monkeypatch, tmp_path):
    """Two rounds that stay off the target: each new search asks for target / pooled bias (not the last round's
    ratio alone) and the last search is kept, untimed."""
    from types import SimpleNamespace

    from llmcompress.stages import puzzle as stages

    asked = []

    def fake_search(lib, budgets, *args):
        asked.append(budgets.target_speedup)  # the table predicts exactly what it is asked for
        return {"solutions": [{"blocks": [], "predicted_speedup": {"decode": budgets.target_speedup}}]}

    measured = iter([1.35, 1.76])  # bias 0.9, then 1.76 / (1.5 / 0.9) = 1.056
    monkeypatch.setattr(stages, "search", fake_search)
    monkeypatch.setattr(stages, "assemble", lambda *args: (object(), []))
    monkeypatch.setattr(stages.BlockLibrary, "load", staticmethod(lambda path: None))
    monkeypatch.setattr("llmcompress.hardware.measure_speedup", lambda *a, **k: {"speedup": next(measured)})
    stage = stages.PuzzleMIPStage(workdir=str(tmp_path), target_speedup=1.5, refine=2, measure_rounds=1)
    budgets = stage.config_of(Budgets)
    lib = {"cost_table": {"prompt_len": 8, "gen_len": 2}}
    out = stage._refine(None, lib, budgets, fake_search(lib, budgets), SimpleNamespace(progress=lambda *a: None))
    bias = (0.9 * 1.76 / (1.5 / 0.9)) ** 0.5
    assert asked == pytest.approx([1.5, 1.5 / 0.9, 1.5 / bias])
    assert [r["correction"] for r in out["refinement"]] == pytest.approx([0.9, bias])
    assert out["searched_speedup"] == pytest.approx(1.5 / bias) and out["measured_speedup"] is None
    assert out["solutions"][0]["predicted_speedup"]["decode"] == pytest.approx(1.5 / bias)
