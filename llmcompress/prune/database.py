"""ZipLM's database (layer x level -> pruned weights, error), its costs from the cost table, and realisation.

Building it is one layer-by-layer calibration pass (one decoder layer in memory at a time): for each layer,
the mean Hessians of the inputs to `o_proj` and `down_proj` are accumulated, structured OBS
(`llmcompress.prune.ziplm.obs_levels`) snapshots every requested level, and the layer's output is propagated.
By default the propagated activations are the dense ones (the database then serves every target); `realise`
with calibration tokens recomputes each chosen level on inputs propagated through the already-pruned layers of
that target (the sequential correction of SparseGPT/ZipLM).

On disk (a folder; written per layer, so an interrupted build resumes): `layer_{i:03d}.safetensors` with
`{part}.{kept}.kept` / `{part}.{kept}.weight` and `meta.json` with errors, energies and the settings.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, ModelGraph, blocks, set_block
from llmcompress.models.modeling_llmcompress import MLP, Attention
from llmcompress.oneshot.calibrate import capture_inputs, first_layer_inputs
from llmcompress.prune.ziplm import Level, activation_channel_scores, obs_levels, output_energy

Progress = Callable[[str, int, int], None]
PARTS = ("attn", "ffn")


@dataclass
class LayerEntry:
    """One decoder layer's levels. attn levels count KV groups kept; ffn levels count channels kept."""

    attn: dict[int, Level] = field(default_factory=dict)
    ffn: dict[int, Level] = field(default_factory=dict)
    residual_energy: float = 0.0  # Σ_t ||x_t||² of the layer's input (the residual stream)
    attn_energy: float = 0.0  # Σ_t ||o_proj(x_t)||²: the attention half's output energy
    ffn_energy: float = 0.0
    ffn_scores: torch.Tensor | None = None  # [I] activation-magnitude channel importance (baseline)
    attn_scores: torch.Tensor | None = None  # [groups]


@dataclass
class Database:
    layers: list[LayerEntry]
    settings: dict

    def levels(self, part: str) -> list[list[int]]:
        return [sorted(getattr(e, part), reverse=True) for e in self.layers]


def default_levels(total: int, steps: int, multiple: int = 1) -> list[int]:
    """`steps` + 1 evenly spaced levels from total down to 0, rounded to a multiple (total and 0 included)."""
    out = {total, 0}
    for i in range(1, steps):
        out.add(max(multiple, round(total * (steps - i) / steps / multiple) * multiple))
    return sorted(out, reverse=True)


def _check_graph(graph: ModelGraph) -> None:
    for i, layer in enumerate(graph.model.layers):
        if not isinstance(layer.self_attn, (Attention, type(None))) or not isinstance(layer.mlp, (MLP, type(None))):
            raise ValueError(f"layer {i} is {blocks(graph)[i].describe()}; ZipLM prunes GQA attention and MLP "
                             "blocks (full, narrower or removed): start from the parent model or a ZipLM result")


def widths(graph: ModelGraph) -> list[tuple[int, int]]:
    """(KV groups, FFN channels) per layer; 0 for a removed part."""
    out = []
    for b in blocks(graph):
        a = 0 if b.attention.kind == "noop" else b.attention.num_kv_heads
        f = 0 if b.ffn.kind == "noop" else b.ffn.intermediate_size
        out.append((a, f))
    return out


def _empty_level(rows: int) -> Level:
    return Level(kept=torch.zeros(0, dtype=torch.long), weight=torch.zeros(rows, 0), error=0.0)


def _save_layer(folder: Path, i: int, entry: LayerEntry) -> None:
    tensors, meta = {}, {"residual_energy": entry.residual_energy, "attn_energy": entry.attn_energy,
                         "ffn_energy": entry.ffn_energy, "errors": {}}
    for part in PARTS:
        for kept, lv in getattr(entry, part).items():
            tensors[f"{part}.{kept}.kept"] = lv.kept.contiguous()
            tensors[f"{part}.{kept}.weight"] = lv.weight.contiguous()
            meta["errors"][f"{part}.{kept}"] = lv.error
    tensors["ffn_scores"] = entry.ffn_scores.contiguous()
    tensors["attn_scores"] = entry.attn_scores.contiguous()
    tmp = folder / f"layer_{i:03d}.tmp"
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.rename(folder / f"layer_{i:03d}.safetensors")


def _load_layer(path: Path) -> LayerEntry:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    t = load_file(str(path))
    entry = LayerEntry(residual_energy=meta["residual_energy"], attn_energy=meta["attn_energy"],
                       ffn_energy=meta["ffn_energy"], ffn_scores=t["ffn_scores"], attn_scores=t["attn_scores"])
    for key, err in meta["errors"].items():
        part, kept = key.split(".")
        getattr(entry, part)[int(kept)] = Level(kept=t[f"{key}.kept"], weight=t[f"{key}.weight"], error=err)
    return entry


@torch.no_grad()
def build_database(graph: ModelGraph, tokens: torch.Tensor, ffn_levels: list[int] | None = None,
                   attn_levels: list[int] | None = None, folder: Path | None = None, batch_size: int = 8,
                   percdamp: float = 0.01, device=None, progress: Progress | None = None) -> Database:
    """Structured OBS database of `graph` on calibration tokens [N, S]. Levels default to 16 FFN steps (multiples
    of 32 channels) and every KV-group count. `folder`: write/resume the database there."""
    _check_graph(graph)
    cfg = graph.config
    groups = cfg.num_key_value_heads
    rep = cfg.num_attention_heads // groups
    ffn_levels = ffn_levels or default_levels(cfg.intermediate_size, 16, 32)
    attn_levels = attn_levels or list(range(groups, -1, -1))
    current = widths(graph)
    for i, b in enumerate(blocks(graph)):
        if b.attention.kind != "noop" and b.attention.num_heads != rep * b.attention.num_kv_heads:
            raise ValueError(f"layer {i} ({b.describe()}) does not keep the parent's {rep} query heads per KV group")
    settings = {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "ffn_levels": ffn_levels,
                "attn_levels": attn_levels, "percdamp": percdamp, "attn_width": rep * cfg.head_dim,
                "layers": len(graph.model.layers)}
    if any(w != (groups, cfg.intermediate_size) for w in current):  # an already-pruned model (gradual mode)
        settings["widths"] = [list(w) for w in current]
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "settings.json"
        if meta.exists() and json.loads(meta.read_text()) != settings:
            raise ValueError(f"{folder} holds a database built with other settings; remove it or choose another "
                             "folder")
        meta.write_text(json.dumps(settings, indent=1))
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = first_layer_inputs(graph, tokens, batch_size, device)
    n_tok = int(tokens.numel())
    entries = []
    n = len(graph.model.layers)
    for idx, layer in enumerate(graph.model.layers):
        path = folder / f"layer_{idx:03d}.safetensors" if folder is not None else None
        layer.to(device)
        attn, mlp = layer.self_attn, layer.mlp
        cached = path is not None and path.exists()
        entry = _load_layer(path) if cached else LayerEntry()
        if not cached:
            entry.residual_energy = float(sum(x.double().pow(2).sum() for x, _, _ in inputs))
        a_now, f_now = current[idx]
        # levels: the search's sizes at most this layer's current width, and the current width itself
        a_levels = sorted({lv for lv in attn_levels if lv <= a_now} | {a_now}, reverse=True)
        f_levels = sorted({lv for lv in ffn_levels if lv <= f_now} | {f_now}, reverse=True)
        mids = inputs
        if attn is not None:
            with capture_inputs({"o": attn.o_proj}, hessian=not cached) as st_o:
                mids = [(x + attn(layer.input_layernorm(x), cos, sin, None, None), cos, sin) for x, cos, sin in inputs]
        outs = mids
        if mlp is not None:
            with capture_inputs({"d": mlp.down_proj}, hessian=not cached) as st_d:
                outs = [(x + mlp(layer.post_attention_layernorm(x)), cos, sin) for x, cos, sin in mids]
        if not cached:
            if attn is not None:
                Ho = st_o["o"].H
                entry.attn = obs_levels(attn.o_proj.weight, Ho, rep * cfg.head_dim, a_levels, n_tok, percdamp)
                entry.attn_energy = output_energy(attn.o_proj.weight, Ho, n_tok)
                entry.attn_scores = st_o["o"].sqnorm.reshape(a_now, -1).sum(1).cpu()
            else:
                entry.attn, entry.attn_scores = {0: _empty_level(cfg.hidden_size)}, torch.zeros(0)
            if mlp is not None:
                Hd = st_d["d"].H
                entry.ffn = obs_levels(mlp.down_proj.weight, Hd, 1, f_levels, n_tok, percdamp)
                entry.ffn_energy = output_energy(mlp.down_proj.weight, Hd, n_tok)
                entry.ffn_scores = activation_channel_scores(mlp.down_proj.weight.float(), st_d["d"].sqnorm).cpu()
            else:
                entry.ffn, entry.ffn_scores = {0: _empty_level(cfg.hidden_size)}, torch.zeros(0)
            if path is not None:
                _save_layer(folder, idx, entry)
        entries.append(entry)
        inputs = outs
        layer.to(home)
        if progress is not None:
            progress("ZipLM database (structured OBS per layer)", idx + 1, n)
    return Database(entries, settings)


def load_database(folder: Path) -> Database:
    settings = json.loads((folder / "settings.json").read_text())
    files = sorted(folder.glob("layer_*.safetensors"))
    if len(files) != settings["layers"]:
        raise ValueError(f"{folder} holds {len(files)} of {settings['layers']} layers; rebuild it to finish")
    return Database([_load_layer(f) for f in files], settings)


# ----------------------------------------------------------------------------- blocks, errors, costs
def block_of(cfg, part: str, kept: int) -> AttentionConfig | FFNConfig:
    """The block variant of a part pruned to `kept` structures."""
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    if part == "attn":
        return AttentionConfig(kind="noop") if kept == 0 else \
            AttentionConfig(num_heads=rep * kept, num_kv_heads=kept)
    return FFNConfig(kind="noop") if kept == 0 else FFNConfig(intermediate_size=kept)


def part_errors(db: Database, normalise: str = "output") -> list[list[float]]:
    """Per part (layer 0 attn, layer 0 ffn, layer 1 attn, ...), the error of each level (level lists of
    `db.levels`), normalised: 'residual' divides by the layer input's energy (relative change of the residual
    stream), 'output' by the part's own output energy, 'none' leaves the summed squared error."""
    out = []
    for e in db.layers:
        for part in PARTS:
            levels = getattr(e, part)
            if normalise == "residual":
                scale = e.residual_energy
            elif normalise == "output":
                scale = e.attn_energy if part == "attn" else e.ffn_energy
            elif normalise == "none":
                scale = 1.0
            else:
                raise ValueError(f"normalise {normalise!r}: choose residual, output or none")
            out.append([levels[k].error / max(scale, 1e-30) for k in sorted(levels, reverse=True)])
    return out


def part_costs(db: Database, cfg, cost_model, metric: str = "decode", batch: int = 1) -> tuple[list[list[float]],
                                                                                               float]:
    """Per part, the latency (ms) of each level from the cost table, and the constant rest: head + per layer
    (- the empty layer, counted once in attention + ffn - empty). -> (costs, constant)"""
    from llmcompress.hardware.profile import HEAD, entry_key

    if metric not in ("decode", "prefill"):
        raise ValueError(f"metric {metric!r}: choose decode or prefill")
    table = cost_model.table

    def ms(entry) -> float:
        timings = getattr(entry, metric)
        if batch not in timings:
            raise ValueError(f"batch {batch} was not profiled; profile again with --batch {batch}")
        return timings[batch].median_ms

    costs = []
    for e in db.layers:
        for part in PARTS:
            name = "attention" if part == "attn" else "ffn"
            costs.append([ms(cost_model.entry(name, block_of(cfg, part, k))) for k in sorted(getattr(e, part),
                                                                                             reverse=True)])
    empty = table.entries[entry_key("attention", "noop", "none")]
    head = table.entries[entry_key("head", HEAD, "dense")]
    constant = ms(head) - len(db.layers) * ms(empty)
    return costs, constant


# ----------------------------------------------------------------------------- realisation
def _set_level(graph: ModelGraph, i: int, part: str, kept: int, level: Level) -> None:
    cfg = graph.config
    layer = graph.model.layers[i]
    b = blocks(graph)[i]
    variant = block_of(cfg, part, kept)
    if part == "attn":
        old = layer.self_attn
        set_block(graph, i, BlockConfig(attention=variant, ffn=b.ffn))
        new = graph.model.layers[i].self_attn
        if kept:
            hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
            kv_rows = (level.kept[:, None] * hd + torch.arange(hd)).flatten()
            q_rows = (level.kept[:, None] * rep * hd + torch.arange(rep * hd)).flatten()
            with torch.no_grad():
                for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                    src, dst = getattr(old, name), getattr(new, name)
                    dst.weight.copy_(src.weight[rows.to(src.weight.device)])
                    if src.bias is not None:
                        dst.bias.copy_(src.bias[rows.to(src.weight.device)])
                new.o_proj.weight.copy_(level.weight)
    else:
        set_block(graph, i, BlockConfig(attention=b.attention, ffn=variant),
                  channels=level.kept if kept else None)
        if kept:
            with torch.no_grad():
                graph.model.layers[i].mlp.down_proj.weight.copy_(level.weight)


def realise(graph: ModelGraph, db: Database, choice: list[tuple[int, int]], tokens: torch.Tensor | None = None,
            batch_size: int = 8, device=None, progress: Progress | None = None) -> ModelGraph:
    """A pruned copy of `graph` with (attn KV groups kept, ffn channels kept) per layer from the database.

    tokens: if given, each layer's chosen levels are recomputed by OBS on inputs propagated through the layers
    already pruned (sequential correction); otherwise the database's weights (dense-input OBS) are used."""
    if len(choice) != len(graph.model.layers):
        raise ValueError(f"{len(choice)} choices for {len(graph.model.layers)} layers")
    out = copy.deepcopy(graph)
    if tokens is None:
        for i, (a, f) in enumerate(choice):
            for part, kept in (("attn", a), ("ffn", f)):
                full = max(getattr(db.layers[i], part))
                if kept != full:
                    _set_level(out, i, part, kept, getattr(db.layers[i], part)[kept])
        return out
    cfg = graph.config
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    current = widths(graph)
    home = next(out.parameters()).device
    device = torch.device(device) if device is not None else home
    with torch.no_grad():
        inputs = first_layer_inputs(out, tokens, batch_size, device)
        n_tok = int(tokens.numel())
        for i, (a, f) in enumerate(choice):
            layer = out.model.layers[i].to(device)
            if a != current[i][0]:
                if a:
                    with capture_inputs({"o": layer.self_attn.o_proj}) as st:
                        for x, cos, sin in inputs:
                            layer.self_attn(layer.input_layernorm(x), cos, sin, None, None)
                    lv = obs_levels(layer.self_attn.o_proj.weight, st["o"].H, rep * cfg.head_dim, [a], n_tok,
                                    db.settings["percdamp"])[a]
                else:
                    lv = None
                _set_level(out, i, "attn", a, lv)
                layer = out.model.layers[i].to(device)
            if layer.self_attn is not None:
                inputs = [(x + layer.self_attn(layer.input_layernorm(x), cos, sin, None, None), cos, sin)
                          for x, cos, sin in inputs]
            if f != current[i][1]:
                if f:
                    with capture_inputs({"d": layer.mlp.down_proj}) as st:
                        for x, _, _ in inputs:
                            layer.mlp(layer.post_attention_layernorm(x))
                    lv = obs_levels(layer.mlp.down_proj.weight, st["d"].H, 1, [f], n_tok, db.settings["percdamp"])[f]
                else:
                    lv = None
                _set_level(out, i, "ffn", f, lv)
                layer = out.model.layers[i].to(device)
            if layer.mlp is not None:
                inputs = [(x + layer.mlp(layer.post_attention_layernorm(x)), cos, sin) for x, cos, sin in inputs]
            layer.to(home)
            if progress is not None:
                progress("ZipLM: realising with propagated inputs", i + 1, len(choice))
    return out


def realise_uniform(graph: ModelGraph, db: Database, kv_groups: int, ffn_kept: int) -> ModelGraph:
    """Minitron-style uniform width baseline: every layer keeps the same number of KV groups and FFN channels,
    chosen by activation magnitude (no weight update)."""
    cfg = graph.config
    out = copy.deepcopy(graph)
    for i, e in enumerate(db.layers):
        if kv_groups != cfg.num_key_value_heads:
            kept = torch.sort(torch.argsort(e.attn_scores, descending=True)[:kv_groups]).values
            hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
            cols = (kept[:, None] * rep * hd + torch.arange(rep * hd)).flatten()
            w = out.model.layers[i].self_attn.o_proj.weight[:, cols].detach().clone()
            _set_level(out, i, "attn", kv_groups, Level(kept=kept, weight=w, error=0.0))
        if ffn_kept != cfg.intermediate_size:
            kept = torch.sort(torch.argsort(e.ffn_scores, descending=True)[:ffn_kept]).values
            w = out.model.layers[i].mlp.down_proj.weight[:, kept].detach().clone()
            _set_level(out, i, "ffn", ffn_kept, Level(kept=kept, weight=w, error=0.0))
    return out


__all__ = ["Database", "LayerEntry", "block_of", "build_database", "default_levels", "load_database", "part_costs",
           "part_errors", "realise", "realise_uniform", "widths"]
