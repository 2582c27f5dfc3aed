"""Replace-1-block scoring and the scored block library (JSON) the MIP reads.

A variant's score: put it (with its BLD weights) into the otherwise intact parent and measure, on held-out
calibration tokens, KL(parent || child) of the next-token distributions (mean over scored positions), or
with metric=lm_loss the increase of the LM loss over the parent's. The parent variant scores 0.
Decoupled scores: each attention variant with the parent FFN, each FFN variant with the parent attention;
a block (attention a, FFN f) scores s(a) + s(f), or with `pairs` every combination is measured itself.

The library file holds per layer every block's score, and per block its costs from a CostTable (via the
CostModel: prefill and decode ms at each profiled batch, parameters, bytes, KV-cache bytes per token),
plus the head (the per-forward fixed cost), so the MIP needs nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from llmcompress.hardware.cost_model import CostModel
from llmcompress.hardware.profile import HEAD, CostTable, entry_key
from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, ModelGraph
from llmcompress.models.modeling_llmcompress import DecoderLayer
from llmcompress.oneshot.calibrate import first_layer_inputs
from llmcompress.prune.layers import kl_div, kl_logp
from llmcompress.puzzle.bld import load_variant
from llmcompress.puzzle.library import PARTS, BlockLibrary, variant_name

Progress = Callable[[str, int, int], None]
SCHEMA_VERSION = 1


class ScoreConfig(BaseModel):
    """How blocks are scored. These fields are the `puzzle_score` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal["kl", "lm_loss"] = Field("kl", description="KL(parent || child), or the LM-loss increase")
    num_samples: int = Field(8, gt=0, description="held-out calibration sequences")
    positions: int | None = Field(None, gt=0, description="score only the last N positions of each sequence "
                                  "(the LM head over every position dominates the cost)")
    pairs: bool = Field(False, description="measure every (attention, FFN) pair instead of summing their scores")
    batch_size: int = Field(4, gt=0)


# ----------------------------------------------------------------------------- math (pure)
def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits: [B, P, V] for the last P positions of ids [B, S] -> scalar"""
    p = logits.shape[1]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, ids.shape[1] - p + 1:].flatten())


def pair_scores(att: list[float], ffn: list[float]) -> list[list[float]]:
    """Decoupled block scores s(a) + s(f). -> [A][F]"""
    return [[a + f for f in ffn] for a in att]


# ----------------------------------------------------------------------------- replace-1-block
def _tail(graph: ModelGraph, start: int, x: torch.Tensor, cos, sin, positions: int | None) -> torch.Tensor:
    """Logits from layer `start` on. x: [B, S, D] -> [B, P, V]"""
    for layer in graph.model.layers[start:]:
        x = layer(x, cos, sin, None, None)
    if positions:
        x = x[:, -positions:]
    return graph.lm_head(graph.model.norm(x))


def compose(config, attention_layer: DecoderLayer, ffn_layer: DecoderLayer, block: BlockConfig) -> DecoderLayer:
    """One layer from an attention variant's layer and an FFN variant's layer (see bld.child_layer)."""
    with torch.device("meta"):  # every part is replaced below: allocate nothing
        layer = DecoderLayer(config, block.to_hf(config.hidden_size), 0)
    layer.input_layernorm, layer.self_attn = attention_layer.input_layernorm, attention_layer.self_attn
    layer.post_attention_layernorm, layer.mlp = ffn_layer.post_attention_layernorm, ffn_layer.mlp
    return layer


def _is_parent(kind: str, variant, library: BlockLibrary) -> bool:
    if kind == "pair":
        return variant == (library.parent.attention, library.parent.ffn)
    return variant == library.parent_part(kind)


@torch.no_grad()
def score_blocks(graph: ModelGraph, library: BlockLibrary, tokens: torch.Tensor, cfg: ScoreConfig,
                 bld_folder: str | Path | None = None, device=None, progress: Progress | None = None) -> dict:
    """Replace-1-block scores of every variant on tokens [N, S].
    -> {"attention": [[score per variant] per layer], "ffn": [...], "pairs": [[[A][F]] per layer] or None,
        "trained": {part: [[bool]]}, "protocol": str}"""
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    graph.to(device)
    folder = Path(bld_folder) if bld_folder is not None else None
    if cfg.positions is not None and cfg.positions > tokens.shape[1]:
        raise ValueError(f"positions={cfg.positions} exceeds the sequence length {tokens.shape[1]}")
    inputs = first_layer_inputs(graph, tokens, cfg.batch_size, device)  # per batch (x [B, S, D], cos, sin)
    batches = [b.to(device) for b in tokens.split(cfg.batch_size)]
    L = len(graph.model.layers)
    if library.attention[0] != library.parent.attention or library.ffn[0] != library.parent.ffn:
        raise ValueError("the library's first variants must be the parent's (build it with build_library)")
    out = {"attention": [], "ffn": [], "pairs": [] if cfg.pairs else None, "trained": {"attention": [], "ffn": []}}
    per_layer = len(library.attention) + len(library.ffn) + (len(library.attention) * len(library.ffn)
                                                            if cfg.pairs else 0)
    label, done = f"scoring {L * per_layer} blocks (replace-1-block, {cfg.metric})", 0
    n_tokens = len(tokens)
    for i in range(L):
        parent = graph.model.layers[i]
        children = {}
        for part in PARTS:
            for v in library.variants(part):
                if v == library.parent_part(part):
                    children[(part, variant_name(v))] = (None, True)
                else:
                    children[(part, variant_name(v))] = load_variant(parent, graph.config, library, i, part, v, folder)

        def layer_for(att: AttentionConfig, ffn: FFNConfig) -> DecoderLayer:
            block = BlockConfig(attention=att, ffn=ffn)
            a = children[("attention", variant_name(att))][0] or parent
            f = children[("ffn", variant_name(ffn))][0] or parent
            return compose(graph.config, a, f, block)

        candidates = [("attention", a, layer_for(a, library.parent.ffn)) for a in library.attention]
        candidates += [("ffn", f, layer_for(library.parent.attention, f)) for f in library.ffn]
        if cfg.pairs:
            candidates += [("pair", (a, f), layer_for(a, f)) for a in library.attention for f in library.ffn]
        totals = torch.zeros(len(candidates), dtype=torch.float64)
        for (x, cos, sin), ids in zip(inputs, batches):
            ref = None
            for k, (kind, variant, layer) in enumerate(candidates):
                if k > 0 and _is_parent(kind, variant, library):
                    continue  # the parent block again: its score is 0 by definition
                logits = _tail(graph, i + 1, layer(x, cos, sin, None, None), cos, sin, cfg.positions)
                if ref is None:  # candidates[0] is the parent block: the parent's own logits
                    ref = logits
                    ref_loss = lm_loss(ref, ids) if cfg.metric == "lm_loss" else None
                if cfg.metric == "kl":
                    totals[k] += kl_div(ref, logits).item() * len(ids)
                else:
                    totals[k] += (lm_loss(logits, ids) - ref_loss).item() * len(ids)
            x.copy_(parent(x, cos, sin, None, None))  # the next layer's input, in place
        scores = (totals / n_tokens).tolist()
        na, nf = len(library.attention), len(library.ffn)
        out["attention"].append(scores[:na])
        out["ffn"].append(scores[na:na + nf])
        if cfg.pairs:
            out["pairs"].append([scores[na + nf + a * nf: na + nf + (a + 1) * nf] for a in range(na)])
        for part in PARTS:
            out["trained"][part].append([children[(part, variant_name(v))][1] for v in library.variants(part)])
        done += per_layer
        if progress is not None:
            progress(label, done, L * per_layer)
    graph.to(home)
    pos = f"the last {cfg.positions} positions" if cfg.positions else "every position"
    out["protocol"] = (f"replace-1-block {'KL(parent || child)' if cfg.metric == 'kl' else 'LM-loss increase'} "
                       f"on {n_tokens} held-out calibration sequences of {tokens.shape[1]} tokens, {pos}")
    return out


# ----------------------------------------------------------------------------- in context
def _references(parent: ModelGraph, batches: list[torch.Tensor], cfg: ScoreConfig) -> list[tuple]:
    """Per batch ids [B, S]: (parent log-probs [B, P, V], None) for metric kl, (None, parent LM loss) for lm_loss."""
    refs = []
    for ids in batches:
        logits = parent(ids).logits[:, -cfg.positions:] if cfg.positions else parent(ids).logits
        refs.append((F.log_softmax(logits.float(), -1), None) if cfg.metric == "kl" else (None, lm_loss(logits, ids)))
    return refs


def _score(logits: torch.Tensor, ids: torch.Tensor, ref: tuple, metric: str) -> float:
    """KL(parent || model) or the LM-loss increase on one batch. logits: [B, P, V], ref: from _references"""
    if metric == "kl":
        return kl_logp(ref[0], F.log_softmax(logits.float(), -1)).item()
    return (lm_loss(logits, ids) - ref[1]).item()


@torch.no_grad()
def model_score(parent: ModelGraph, model: ModelGraph, tokens: torch.Tensor, cfg: ScoreConfig) -> float:
    """The whole model's score on tokens [N, S] under the scoring protocol: mean KL(parent || model) over the
    scored positions (metric kl) or its LM loss minus the parent's (metric lm_loss)."""
    device = next(model.parameters()).device
    batches = [b.to(device) for b in tokens.split(cfg.batch_size)]
    total = 0.0
    for ids, ref in zip(batches, _references(parent, batches, cfg)):
        logits = model(ids).logits
        total += _score(logits[:, -cfg.positions:] if cfg.positions else logits, ids, ref, cfg.metric) * len(ids)
    return total / len(tokens)


@torch.no_grad()
def score_in_context(parent: ModelGraph, model: ModelGraph, library: BlockLibrary, choice: list[BlockConfig],
                     tokens: torch.Tensor, cfg: ScoreConfig, bld_folder: str | Path | None = None,
                     progress: Progress | None = None) -> dict:
    """Block scores around a chosen model instead of around the parent: for every layer and every attention
    (FFN) variant, the change of the model's score (see model_score) when that layer's attention (FFN) alone
    is swapped for the variant, its other part kept as chosen. The chosen parts score 0; a negative score is
    a swap that helps. A block (a, f) then scores s(a) + s(f): the MIP over these scores searches the
    neighbourhood of the choice with the interactions the replace-1-block scores (all around the parent) miss.
    model: assemble(parent, library, choice). -> {"attention": [[score per variant] per layer], "ffn": [...],
    "base": model_score of the model, "trained": {part: [[bool]]}, "protocol": str}"""
    if len(choice) != len(model.model.layers) or len(choice) != len(parent.model.layers):
        raise ValueError(f"{len(choice)} blocks given for a {len(model.model.layers)}-layer model")
    if cfg.positions is not None and cfg.positions > tokens.shape[1]:
        raise ValueError(f"positions={cfg.positions} exceeds the sequence length {tokens.shape[1]}")
    device = next(model.parameters()).device
    folder = Path(bld_folder) if bld_folder is not None else None
    batches = [b.to(device) for b in tokens.split(cfg.batch_size)]
    refs = _references(parent, batches, cfg)
    inputs = first_layer_inputs(model, tokens, cfg.batch_size, device)  # per batch (x [B, S, D], cos, sin)
    L = len(choice)
    base = sum(_score(_tail(model, 0, x, cos, sin, cfg.positions), ids, ref, cfg.metric) * len(ids)
               for (x, cos, sin), ids, ref in zip(inputs, batches, refs)) / len(tokens)
    out = {"attention": [], "ffn": [], "base": base, "trained": {"attention": [], "ffn": []}}
    per_layer = len(library.attention) + len(library.ffn) - 2
    label = f"scoring {L * per_layer} blocks in the chosen model ({cfg.metric})"
    for i, block in enumerate(choice):
        current, source = model.model.layers[i], parent.model.layers[i]
        candidates, trained = [], {"attention": [], "ffn": []}
        for part in PARTS:
            chosen = block.attention if part == "attention" else block.ffn
            for v in library.variants(part):
                if v == chosen:
                    trained[part].append(True)
                    continue
                if v == library.parent_part(part):
                    child, ok = source, True
                else:
                    child, ok = load_variant(source, parent.config, library, i, part, v, folder)
                trained[part].append(ok)
                if part == "attention":
                    layer = compose(parent.config, child, current, BlockConfig(attention=v, ffn=block.ffn))
                else:
                    layer = compose(parent.config, current, child, BlockConfig(attention=block.attention, ffn=v))
                candidates.append((part, variant_name(v), layer.to(device)))
        totals = {(part, name): 0.0 for part, name, _ in candidates}
        for (x, cos, sin), ids, ref in zip(inputs, batches, refs):
            for part, name, layer in candidates:
                logits = _tail(model, i + 1, layer(x, cos, sin, None, None), cos, sin, cfg.positions)
                totals[(part, name)] += _score(logits, ids, ref, cfg.metric) * len(ids)
            x.copy_(current(x, cos, sin, None, None))  # the next layer's input, in place
        for part in PARTS:
            out[part].append([totals[(part, variant_name(v))] / len(tokens) - base
                              if (part, variant_name(v)) in totals else 0.0 for v in library.variants(part)])
            out["trained"][part].append(trained[part])
        if progress is not None:
            progress(label, (i + 1) * per_layer, L * per_layer)
    pos = f"the last {cfg.positions} positions" if cfg.positions else "every position"
    what = "KL(parent || model)" if cfg.metric == "kl" else "LM-loss increase"
    out["protocol"] = (f"in-context swap, change of {what} on {len(tokens)} calibration sequences of "
                       f"{tokens.shape[1]} tokens, {pos}")
    return out


def context_matrix(lib: dict, scores: dict) -> list[list[float]]:
    """In-context scores (score_in_context) as the MIP's objective over the scored library's blocks. -> [L][V]"""
    out = []
    for layer, sa, sf in zip(lib["layers"], scores["attention"], scores["ffn"]):
        att, ffn = dict(zip(layer["attention"], sa)), dict(zip(layer["ffn"], sf))
        out.append([att[a] + ffn[f] for a, f in (b["name"].split("+") for b in layer["blocks"])])
    return out


# ----------------------------------------------------------------------------- costs
def block_costs(table: CostTable, block: BlockConfig, fmt: str = "dense") -> dict:
    """One block's costs at every profiled batch: prefill_ms/decode_ms {batch: ms}, params, param_bytes,
    kv_bytes_per_token."""
    cm = CostModel(table)
    rows = {b: cm.layer_costs([(block, fmt, fmt)], b)[0] for b in table.settings.batches}
    first = rows[table.settings.batches[0]]
    return {"prefill_ms": {str(b): r["prefill_ms"] for b, r in rows.items()},
            "decode_ms": {str(b): r["decode_ms"] for b, r in rows.items()},
            "params": first["params"], "param_bytes": first["param_bytes"],
            "kv_bytes_per_token": first["kv_bytes_per_token"]}


def head_costs(table: CostTable) -> dict:
    head = table.entries.get(entry_key("head", HEAD, "dense"))
    if head is None:
        raise ValueError("the cost table has no head entry; profile it again (llmcompress profile)")
    return {"prefill_ms": {str(b): t.median_ms for b, t in head.prefill.items()},
            "decode_ms": {str(b): t.median_ms for b, t in head.decode.items()},
            "params": head.params, "param_bytes": head.param_bytes, "kv_bytes_per_token": 0}


def scored_library(library: BlockLibrary, scores: dict, table: CostTable, fmt: str = "dense") -> dict:
    """The block library file's content: every (attention, FFN) block per layer with score and costs."""
    costs = {}
    for a in library.attention:
        for f in library.ffn:
            block = BlockConfig(attention=a, ffn=f)
            costs[f"{variant_name(a)}+{variant_name(f)}"] = block_costs(table, block, fmt)
    layers = []
    for i in range(library.num_layers):
        sa, sf = scores["attention"][i], scores["ffn"][i]
        grid = scores["pairs"][i] if scores.get("pairs") else pair_scores(sa, sf)
        layers.append({
            "layer": i,
            "attention": {variant_name(a): {"score": sa[k], "trained": scores["trained"]["attention"][i][k]}
                          for k, a in enumerate(library.attention)},
            "ffn": {variant_name(f): {"score": sf[k], "trained": scores["trained"]["ffn"][i][k]}
                    for k, f in enumerate(library.ffn)},
            "blocks": [{"name": f"{variant_name(a)}+{variant_name(f)}", "score": grid[ka][kf]}
                       for ka, a in enumerate(library.attention) for kf, f in enumerate(library.ffn)],
        })
    s = table.settings
    return {
        "schema_version": SCHEMA_VERSION,
        "parent": library.parent.model_dump(),
        "variants": {"attention": {variant_name(a): a.model_dump() for a in library.attention},
                     "ffn": {variant_name(f): f.model_dump() for f in library.ffn}},
        "score": {"pairs": bool(scores.get("pairs")), "protocol": scores.get("protocol", "")},
        "cost_table": {"device": table.device, "dtype": table.dtype, "batches": s.batches,
                       "prompt_len": s.prompt_len, "gen_len": s.gen_len, "format": fmt},
        "head": head_costs(table),
        "costs": costs,
        "layers": layers,
    }


def block_of(lib: dict, name: str) -> BlockConfig:
    """The BlockConfig of a library block name '<attention>+<ffn>'."""
    a, f = name.split("+")
    return BlockConfig(attention=AttentionConfig(**lib["variants"]["attention"][a]),
                       ffn=FFNConfig(**lib["variants"]["ffn"][f]))


def save_library(lib: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(lib, indent=1))
    os.replace(tmp, path)
    return path


def load_library(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"scored block library {path} does not exist; run the puzzle_score stage first "
                         "(or rerun with --from puzzle_score)")
    lib = json.loads(path.read_text())
    if lib.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema {lib.get('schema_version')}, expected {SCHEMA_VERSION}; score again")
    return lib
