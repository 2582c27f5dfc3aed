"""Puzzle's search: a mixed-integer program over the scored block library, and two baselines.

    minimise   sum_l sum_v score[l][v] x[l][v]
    subject to sum_v x[l][v] = 1                                   for every layer l
               sum_l sum_v cost_k[l][v] x[l][v] + offset_k <= limit_k   for every budget k
               sum_l x[l][prev_l] <= max_common                    for every earlier solution prev
               x[l][v] in {0, 1}
Budgets (any subset; see `Budgets`): prefill latency, decode latency (or a target speed-up over the parent),
decode throughput at a batch size, memory (weights + KV cache at a batch and length), parameter count.
Two back-ends solve the same model: ortools (SCIP through pywraplp) and pulp (CBC). Each budget row is
scaled to unit largest coefficient before it is handed to a solver; the optimality gap is 0.
An infeasible budget raises ValueError naming, for each budget, the tightest value that is feasible with the
others kept. Baselines: greedy by score-per-cost from the parent, and uniform (one block everywhere).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backend = Literal["ortools", "pulp"]
BACKENDS = ("ortools", "pulp")
Matrix = Sequence[Sequence[float]]  # [L][V_l]: per layer, one value per variant


@dataclass
class Budget:
    """sum of costs[l][choice[l]] + offset <= limit. The user sees total / scale (or invert / total)."""

    name: str
    costs: Matrix
    offset: float
    limit: float
    unit: str = ""
    scale: float = 1.0
    invert: float | None = None  # throughput: the user's value is invert / total and is a lower bound

    def total(self, choice: Sequence[int]) -> float:
        return self.offset + sum(self.costs[l][v] for l, v in enumerate(choice))

    def user(self, total: float) -> float:
        return self.invert / total if self.invert else total / self.scale

    def value(self, total: float) -> str:
        return f"{self.user(total):.6g}{(' ' + self.unit) if self.unit else ''}"

    def describe(self, total: float | None = None) -> str:
        return f"{self.name} {'>=' if self.invert else '<='} {self.value(self.limit if total is None else total)}"


@dataclass
class Solution:
    choice: list[int]  # variant index per layer
    objective: float
    optimal: bool


# ----------------------------------------------------------------------------- solvers
def _rows(budgets: Sequence[Budget]) -> list[tuple[Matrix, float]]:
    """Budget rows as (coefficients, right-hand side), each scaled to unit largest |coefficient|."""
    rows = []
    for b in budgets:
        s = max((abs(c) for row in b.costs for c in row), default=0.0) or 1.0
        rows.append(([[c / s for c in row] for row in b.costs], (b.limit - b.offset) / s))
    return rows


def _milp(backend: Backend, objective: Matrix, rows: list[tuple[Matrix, float]], time_limit_s: float
          ) -> Solution | None:
    """min objective·x, one variant per layer, rows·x <= rhs. None when infeasible."""
    if backend == "ortools":
        return _milp_ortools(objective, rows, time_limit_s)
    if backend == "pulp":
        return _milp_pulp(objective, rows, time_limit_s)
    raise ValueError(f"MIP backend {backend!r} is not one of {', '.join(BACKENDS)}")


def _milp_ortools(objective: Matrix, rows, time_limit_s: float) -> Solution | None:
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("SCIP")
    if s is None:
        raise ValueError("ortools was built without SCIP; use backend pulp or reinstall ortools")
    x = [[s.BoolVar(f"x_{l}_{v}") for v in range(len(o))] for l, o in enumerate(objective)]
    for xl in x:
        s.Add(sum(xl) == 1)
    for coeffs, rhs in rows:
        terms = [c * x[l][v] for l, row in enumerate(coeffs) for v, c in enumerate(row) if c]
        if terms:
            s.Add(sum(terms) <= rhs)
        elif rhs < 0:
            return None
    s.Minimize(sum(c * x[l][v] for l, o in enumerate(objective) for v, c in enumerate(o)))
    s.SetTimeLimit(int(1000 * time_limit_s))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    status = s.Solve(params)
    if status == pywraplp.Solver.INFEASIBLE:
        return None
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise ValueError(f"ortools stopped without a solution (status {status}); raise time_limit_s")
    choice = [max(range(len(xl)), key=lambda v: xl[v].solution_value()) for xl in x]
    return Solution(choice, sum(objective[l][v] for l, v in enumerate(choice)), status == pywraplp.Solver.OPTIMAL)


def _milp_pulp(objective: Matrix, rows, time_limit_s: float) -> Solution | None:
    import pulp

    prob = pulp.LpProblem("puzzle", pulp.LpMinimize)
    var = prob.add_variable if hasattr(prob, "add_variable") else pulp.LpVariable  # PuLP 4 attaches to the model
    x = [[var(f"x_{l}_{v}", cat="Binary") for v in range(len(o))] for l, o in enumerate(objective)]
    prob += pulp.lpSum(c * x[l][v] for l, o in enumerate(objective) for v, c in enumerate(o))
    for l, xl in enumerate(x):
        prob += pulp.lpSum(xl) == 1, f"one_{l}"
    for k, (coeffs, rhs) in enumerate(rows):
        terms = [c * x[l][v] for l, row in enumerate(coeffs) for v, c in enumerate(row) if c]
        if terms:
            prob += pulp.lpSum(terms) <= rhs, f"row_{k}"
        elif rhs < 0:
            return None
    prob.solve(_cbc(pulp, time_limit_s))
    if prob.status in (pulp.LpStatusInfeasible, pulp.LpStatusUndefined):
        return None
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise ValueError(f"CBC stopped without a solution ({pulp.LpStatus[prob.status]}); raise time_limit_s")
    choice = [max(range(len(xl)), key=lambda v: xl[v].varValue or 0.0) for xl in x]
    return Solution(choice, sum(objective[l][v] for l, v in enumerate(choice)),
                    prob.sol_status == pulp.LpSolutionOptimal)


def _cbc(pulp, time_limit_s: float):
    """CBC: a separately installed one (pulp[cbc]) if present, else the binary bundled with PuLP 3."""
    coin = pulp.COIN_CMD(msg=False, gapRel=0.0, timeLimit=time_limit_s)
    if coin.available():
        return coin
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC in favour of pulp[cbc]
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, timeLimit=time_limit_s)


def _check_shapes(scores: Matrix, budgets: Sequence[Budget]) -> None:
    if not scores or any(len(s) == 0 for s in scores):
        raise ValueError("every layer needs at least one variant")
    for b in budgets:
        if [len(r) for r in b.costs] != [len(s) for s in scores]:
            raise ValueError(f"budget {b.name}: costs do not have one value per (layer, variant) of the scores")


def tightest(budgets: Sequence[Budget], k: int, backend: Backend = "ortools", time_limit_s: float = 60.0
             ) -> float | None:
    """The smallest total of budget k reachable while the other budgets hold (None if they conflict)."""
    others = [b for j, b in enumerate(budgets) if j != k]
    sol = _milp(backend, budgets[k].costs, _rows(others), time_limit_s)
    return None if sol is None else budgets[k].total(sol.choice)


def _infeasible(budgets: Sequence[Budget], backend: Backend, time_limit_s: float) -> ValueError:
    parts = []
    for k, b in enumerate(budgets):
        t = tightest(budgets, k, backend, time_limit_s)
        if t is not None and t > b.limit:
            parts.append(f"{b.describe()}: tightest feasible {b.value(t)}")
    if not parts:  # no single budget's relaxation helps: show each budget's bound on its own
        alone = [f"{b.name} can reach {b.value(b.total([min(range(len(r)), key=r.__getitem__) for r in b.costs]))}"
                 for b in budgets]
        return ValueError("the budgets conflict: no model meets all of them together; on its own " + "; ".join(alone)
                          + ". Relax one of them")
    others = " (with the other budgets kept)" if len(budgets) > 1 else ""
    return ValueError(f"no model in the block library meets the budget{'s' if len(budgets) > 1 else ''}: "
                      + "; ".join(parts) + f"{others}. Relax the budget to at least that value, or add smaller "
                      "variants to the library")


def solve(scores: Matrix, budgets: Sequence[Budget], backend: Backend = "ortools", num_solutions: int = 1,
          max_shared: float = 1.0, time_limit_s: float = 60.0, near: Sequence[int] | None = None,
          max_changed: int | None = None) -> list[Solution]:
    """The best choices of one variant per layer under the budgets. Each further solution shares at most
    floor(max_shared * L) (and always fewer than L) of its layers' choices with every earlier one; fewer than
    `num_solutions` come back when no more diverse ones exist. With `near` (a choice) and `max_changed`, every
    solution differs from `near` in at most max_changed layers (a trust region). Infeasible budgets raise
    ValueError."""
    _check_shapes(scores, budgets)
    if num_solutions < 1 or not 0 <= max_shared <= 1:
        raise ValueError(f"num_solutions must be >= 1 and max_shared in [0, 1], got {num_solutions}, {max_shared}")
    L = len(scores)
    max_common = min(L - 1, math.floor(max_shared * L + 1e-9))
    rows = _rows(budgets)
    if (near is None) != (max_changed is None):
        raise ValueError("give near and max_changed together")
    if near is not None:
        if len(near) != L or max_changed < 0:
            raise ValueError(f"near needs one variant per layer ({L}) and max_changed >= 0")
        rows.append(([[-1.0 if v == near[l] else 0.0 for v in range(len(scores[l]))] for l in range(L)],
                     float(max_changed - L)))  # sum_l x[l][near_l] >= L - max_changed
    found: list[Solution] = []
    for _ in range(num_solutions):
        div = [([[1.0 if v == prev.choice[l] else 0.0 for v in range(len(scores[l]))] for l in range(L)],
                float(max_common)) for prev in found]
        sol = _milp(backend, scores, rows + div, time_limit_s)
        if sol is None:
            if not found:
                raise _infeasible(budgets, backend, time_limit_s)
            break
        found.append(sol)
    return found


# ----------------------------------------------------------------------------- baselines
def feasible(choice: Sequence[int], budgets: Sequence[Budget], tol: float = 1e-9) -> bool:
    return all(b.total(choice) <= b.limit + tol * max(1.0, abs(b.limit)) for b in budgets)


def greedy(scores: Matrix, budgets: Sequence[Budget]) -> list[int]:
    """From the best-scoring variant per layer, repeatedly make the swap with the smallest score increase
    per unit of cost saved (costs of the violated budgets, each relative to its limit) that breaks no
    satisfied budget, until every budget holds."""
    _check_shapes(scores, budgets)
    norm = [max(abs(b.limit - b.offset), 1e-12) for b in budgets]
    choice = [min(range(len(s)), key=lambda v: (s[v], sum(b.costs[l][v] / n for b, n in zip(budgets, norm))))
              for l, s in enumerate(scores)]
    while True:
        totals = [b.total(choice) for b in budgets]
        viol = [k for k, b in enumerate(budgets) if totals[k] > b.limit]
        if not viol:
            return choice
        best, best_ratio = None, math.inf
        for l, s in enumerate(scores):
            cur = choice[l]
            for v in range(len(s)):
                saved = sum((budgets[k].costs[l][cur] - budgets[k].costs[l][v]) / norm[k] for k in viol)
                if v == cur or saved <= 0:
                    continue
                if any(totals[k] - b.costs[l][cur] + b.costs[l][v] > b.limit
                       for k, b in enumerate(budgets) if k not in viol):
                    continue
                ratio = (s[v] - s[cur]) / saved
                if ratio < best_ratio:
                    best, best_ratio = (l, v), ratio
        if best is None:
            raise ValueError("greedy search cannot meet the budgets: " + "; ".join(budgets[k].describe() for k in viol))
        choice[best[0]] = best[1]


def uniform(names: Sequence[Sequence[str]], scores: Matrix, budgets: Sequence[Budget]) -> list[int] | None:
    """The best feasible choice of the same block in every layer (None if no single block fits)."""
    common = [n for n in names[0] if all(n in layer for layer in names)]
    best, best_score = None, math.inf
    for n in common:
        choice = [layer.index(n) for layer in names]
        score = sum(scores[l][v] for l, v in enumerate(choice))
        if feasible(choice, budgets) and score < best_score:
            best, best_score = choice, score
    return best


# ----------------------------------------------------------------------------- from the scored library
class Budgets(BaseModel):
    """Deployment budgets; give any subset. These fields are part of the `puzzle_mip` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    target_speedup: float | None = Field(None, gt=0, description="latency budget = the parent's / this")
    speedup_metric: Literal["decode", "prefill"] = Field("decode", description="which latency target_speedup sets")
    latency_batch: int = Field(1, gt=0, description="batch size of the prefill/decode latency budgets")
    prefill_ms: float | None = Field(None, gt=0, description="prefill latency of the cost table's prompt length")
    decode_ms: float | None = Field(None, gt=0, description="latency of one decode step")
    throughput_tok_s: float | None = Field(None, gt=0, description="decode tokens/s at throughput_batch")
    throughput_batch: int = Field(1, gt=0)
    memory_mb: float | None = Field(None, gt=0, description="weights + KV cache at memory_batch x memory_len")
    memory_batch: int = Field(1, gt=0)
    memory_len: int | None = Field(None, gt=0, description="cached tokens per sequence (default: the cost "
                                   "table's prompt_len + gen_len)")
    params: int | None = Field(None, gt=0, description="parameter count")

    @model_validator(mode="after")
    def _any(self):
        if not any(v is not None for v in (self.target_speedup, self.prefill_ms, self.decode_ms,
                                           self.throughput_tok_s, self.memory_mb, self.params)):
            raise ValueError("give at least one budget: target_speedup, prefill_ms, decode_ms, throughput_tok_s, "
                             "memory_mb or params")
        return self


def _batch(lib: dict, b: int, what: str) -> str:
    if str(b) not in lib["head"]["decode_ms"]:
        raise ValueError(f"{what} {b} was not profiled (the cost table has batches {lib['cost_table']['batches']}); "
                         f"profile again with --batch including {b}")
    return str(b)


def library_matrices(lib: dict) -> tuple[list[list[str]], list[list[float]]]:
    """Block names and scores per layer of a scored library. -> names [L][V], scores [L][V]"""
    names = [[blk["name"] for blk in layer["blocks"]] for layer in lib["layers"]]
    scores = [[blk["score"] for blk in layer["blocks"]] for layer in lib["layers"]]
    return names, scores


def parent_name(lib: dict) -> str:
    p = lib["parent"]
    from llmcompress.models.graph import AttentionConfig, FFNConfig
    from llmcompress.puzzle.library import variant_name

    return f"{variant_name(AttentionConfig(**p['attention']))}+{variant_name(FFNConfig(**p['ffn']))}"


def make_budgets(lib: dict, budgets: Budgets) -> list[Budget]:
    """Linear budget rows over the library's blocks (costs from its cost table)."""
    names, _ = library_matrices(lib)
    head, costs = lib["head"], lib["costs"]
    parent = [parent_name(lib)] * len(names)

    def matrix(f) -> list[list[float]]:
        return [[f(costs[n]) for n in layer] for layer in names]

    out = []
    lb = _batch(lib, budgets.latency_batch, "latency_batch")
    for metric in ("prefill", "decode"):
        key = f"{metric}_ms"
        m = matrix(lambda c: c[key][lb])
        limits = [getattr(budgets, key)]
        if budgets.target_speedup is not None and budgets.speedup_metric == metric:
            parent_total = head[key][lb] + sum(costs[n][key][lb] for n in parent)
            limits.append(parent_total / budgets.target_speedup)
        for limit in limits:
            if limit is not None:
                out.append(Budget(f"{key} (batch {lb})", m, head[key][lb], limit, "ms"))
    if budgets.throughput_tok_s is not None:
        tb = _batch(lib, budgets.throughput_batch, "throughput_batch")
        out.append(Budget(f"throughput (batch {tb})", matrix(lambda c: c["decode_ms"][tb]), head["decode_ms"][tb],
                          1000 * int(tb) / budgets.throughput_tok_s, "tokens/s", invert=1000 * int(tb)))
    if budgets.memory_mb is not None:
        length = budgets.memory_len or lib["cost_table"]["prompt_len"] + lib["cost_table"]["gen_len"]
        per = budgets.memory_batch * length
        out.append(Budget(f"memory (batch {budgets.memory_batch} x {length} tokens)",
                          matrix(lambda c: c["param_bytes"] + c["kv_bytes_per_token"] * per), head["param_bytes"],
                          budgets.memory_mb * 2**20, "MiB", scale=2**20))
    if budgets.params is not None:
        out.append(Budget("params", matrix(lambda c: c["params"]), head["params"], budgets.params))
    return out


def table_bias(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """The cost table's bias as measured / predicted speed-up, pooled over timed solutions (geometric mean):
    a search for a measured target asks the table for target / bias. Pooling keeps one noisy timing on a
    shared machine from swinging the next search."""
    if not predicted or len(predicted) != len(measured):
        raise ValueError(f"need as many measured as predicted speed-ups (got {len(measured)} and {len(predicted)})")
    return math.exp(sum(math.log(m / p) for p, m in zip(predicted, measured)) / len(predicted))


def predict(lib: dict, blocks_per_layer: Sequence[str], latency_batch: int = 1) -> dict:
    """Predicted costs of a choice of blocks (names), from the library's cost table."""
    head, costs, b = lib["head"], lib["costs"], str(latency_batch)
    rows = [costs[n] for n in blocks_per_layer]
    ct = lib["cost_table"]
    kv = sum(r["kv_bytes_per_token"] for r in rows)
    return {"prefill_ms": head["prefill_ms"][b] + sum(r["prefill_ms"][b] for r in rows),
            "decode_ms": head["decode_ms"][b] + sum(r["decode_ms"][b] for r in rows),
            "params": head["params"] + sum(r["params"] for r in rows),
            "param_bytes": head["param_bytes"] + sum(r["param_bytes"] for r in rows),
            "kv_bytes_per_token": kv, "kv_bytes": kv * latency_batch * (ct["prompt_len"] + ct["gen_len"])}


def search(lib: dict, budgets: Budgets, backend: Backend = "ortools", num_solutions: int = 1,
           max_shared: float = 0.8, time_limit_s: float = 60.0, objective: Matrix | None = None,
           near: Sequence[str] | None = None, max_changed: int | None = None) -> dict:
    """Solve the MIP on a scored library and compare with the baselines. `objective` [L][V] replaces the
    library's scores in the MIP only (e.g. in-context scores, score.context_matrix); the baselines and every
    reported "score" keep the library's, so solutions stay comparable. `near` (block names per layer) with
    `max_changed`: solutions differ from it in at most that many layers.
    -> {"budgets": [...], "parent": {...}, "solutions": [{"blocks", "score", "predicted", "speedup", ...}],
        "greedy": {...} | {"error"}, "uniform": {...} | None}"""
    names, scores = library_matrices(lib)
    rows = make_budgets(lib, budgets)
    parent = [parent_name(lib)] * len(names)
    base = predict(lib, parent, budgets.latency_batch)

    def describe(choice: list[int], **extra) -> dict:
        blocks = [names[l][v] for l, v in enumerate(choice)]
        p = predict(lib, blocks, budgets.latency_batch)
        return {"blocks": blocks, "score": sum(scores[l][v] for l, v in enumerate(choice)), "predicted": p,
                "predicted_speedup": {"decode": base["decode_ms"] / p["decode_ms"],
                                      "prefill": base["prefill_ms"] / p["prefill_ms"]},
                "budgets": {r.name: r.user(r.total(choice)) for r in rows}, **extra}

    if objective is not None and [len(o) for o in objective] != [len(s) for s in scores]:
        raise ValueError("objective: give one value per (layer, block) of the library")
    near_idx = None if near is None else [layer.index(n) for layer, n in zip(names, near)]
    sols = solve(scores if objective is None else objective, rows, backend, num_solutions, max_shared, time_limit_s,
                 near_idx, max_changed)
    out = {"backend": backend, "budgets": [r.describe() for r in rows], "parent": base,
           "solutions": [describe(s.choice, optimal=s.optimal)
                         | ({} if objective is None else {"objective": s.objective}) for s in sols]}
    try:
        out["greedy"] = describe(greedy(scores, rows))
    except ValueError as err:
        out["greedy"] = {"error": str(err)}
    u = uniform(names, scores, rows)
    out["uniform"] = describe(u, block=names[0][u[0]]) if u is not None else None
    return out
