"""Realise a Puzzle solution and uptrain it with global knowledge distillation (GKD) from the parent.

`assemble` copies the parent and replaces each layer by its chosen block (`set_block`, Puzzle's
initialisations), loading the BLD weights of the chosen attention and FFN variants where they exist.

GKD loss per batch of token windows (teacher = parent, student = assembled model):
    cosine_weight * mean over layers l of mean over tokens of (1 - cos(h_teacher_l, h_student_l))
  + mse_weight    * mean over layers l of ||h_teacher_l - h_student_l||² / ||h_teacher_l||²  (normalised MSE)
  + kl_weight     * KL(teacher || student) of the next-token distributions
  + lm_weight     * next-token cross-entropy of the student (off by default)
where h_l is the residual stream after layer l (the student keeps the parent's layer count: a removed
block is a no-op layer). Budget in tokens; every `checkpoint_every` steps the student and the optimiser go
to `<folder>/checkpoint-<key>/` (safetensors + JSON), the key hashing the settings, the assembled blocks and the
training windows and the number of steps (the cosine learning-rate schedule spans them), so an interrupted rerun
of the same run resumes there and any other, a changed budget included, starts afresh.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from llmcompress.models.graph import BlockConfig, ModelGraph, blocks, set_block
from llmcompress.prune.layers import kl_logp
from llmcompress.puzzle.bld import block_path, read_block, trained_prefixes
from llmcompress.puzzle.library import PARTS, BlockLibrary, variant_name

Progress = Callable[[str, int, int], None]


class GKDConfig(BaseModel):
    """Global distillation settings. These fields are the `gkd` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(65536, ge=0, description="training tokens (budget); 0 skips uptraining")
    num_samples: int = Field(128, gt=0, description="training sequences drawn from the data section")
    batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cosine_weight: float = Field(1.0, ge=0, description="weight of the per-layer hidden-state cosine distance")
    mse_weight: float = Field(0.0, ge=0, description="weight of the per-layer normalised hidden-state MSE")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on the logits")
    lm_weight: float = Field(0.0, ge=0, description="weight of the student's LM loss (off by default)")
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 0


# ----------------------------------------------------------------------------- math (pure)
def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(a_t, b_t). a, b: [B, S, D] -> scalar"""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def normalised_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||² / ||a||² over all tokens (a = teacher): recovery's relative hidden MSE. a, b: [B, S, D] -> scalar"""
    from llmcompress.recover.losses import hidden_mse

    return hidden_mse(b, a, relative=True)


def gkd_loss(teacher_hidden: Sequence[torch.Tensor], student_hidden: Sequence[torch.Tensor],
             teacher_logits: torch.Tensor, student_logits: torch.Tensor, ids: torch.Tensor,
             cfg: GKDConfig) -> tuple[torch.Tensor, dict]:
    """The GKD loss (module docstring). hidden: L+1 states [B, S, D] each (embeddings first, skipped);
    logits: [B, S, V]; ids: [B, S]. -> (loss, its parts as floats)"""
    if len(teacher_hidden) != len(student_hidden):
        raise ValueError(f"teacher has {len(teacher_hidden) - 1} layers, student {len(student_hidden) - 1}; GKD "
                         "matches layer by layer (keep removed blocks as no-op layers)")
    loss, parts = student_logits.new_zeros((), dtype=torch.float32), {}
    if cfg.cosine_weight:
        cos = torch.stack([cosine_distance(t, s) for t, s in zip(teacher_hidden[1:], student_hidden[1:])]).mean()
        loss, parts["cosine"] = loss + cfg.cosine_weight * cos, cos.item()
    if cfg.mse_weight:
        mse = torch.stack([normalised_mse(t, s) for t, s in zip(teacher_hidden[1:], student_hidden[1:])]).mean()
        loss, parts["mse"] = loss + cfg.mse_weight * mse, mse.item()
    if cfg.kl_weight or cfg.lm_weight:  # one student log-softmax for both: [B, S, V] over the vocabulary
        s_logp = F.log_softmax(student_logits.float(), -1)
    if cfg.kl_weight:
        kl = kl_logp(F.log_softmax(teacher_logits.float(), -1), s_logp)
        loss, parts["kl"] = loss + cfg.kl_weight * kl, kl.item()
    if cfg.lm_weight:
        lm = F.nll_loss(s_logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # the cross-entropy
        loss, parts["lm"] = loss + cfg.lm_weight * lm, lm.item()
    return loss, parts


# ----------------------------------------------------------------------------- assembling
def copy_graph(graph: ModelGraph) -> ModelGraph:
    """A deep copy of the weights and config; the tokenizer and source are shared, not copied."""
    extras = {k: getattr(graph, k) for k in ("tokenizer", "source") if hasattr(graph, k)}
    for k in extras:
        delattr(graph, k)
    try:
        out = copy.deepcopy(graph)
    finally:
        for k, v in extras.items():
            setattr(graph, k, v)
    for k, v in extras.items():
        setattr(out, k, v)
    return out


@torch.no_grad()
def assemble(parent: ModelGraph, library: BlockLibrary, choice: Sequence[BlockConfig],
             bld_folder: str | Path | None = None) -> tuple[ModelGraph, list[dict]]:
    """The parent with layer i replaced by choice[i], with BLD weights where trained.
    -> (graph, per layer {"layer", "block", "trained": {part: bool}})"""
    if len(choice) != len(parent.model.layers):
        raise ValueError(f"{len(choice)} blocks chosen for a {len(parent.model.layers)}-layer parent")
    graph = copy_graph(parent)
    folder = Path(bld_folder) if bld_folder is not None else None
    rows = []
    for i, block in enumerate(choice):
        trained = {}
        if block != library.parent:
            set_block(graph, i, block, channels=library.channels(i, block.ffn))
        layer = graph.model.layers[i]
        for part in PARTS:
            v = block.attention if part == "attention" else block.ffn
            if v == library.parent_part(part) or v.kind == "noop":
                continue
            found = read_block(block_path(folder, i, part, variant_name(v))) if folder is not None else None
            trained[part] = found is not None
            if found is not None:
                ref = next(layer.parameters())
                weights = {k: t.to(device=ref.device, dtype=ref.dtype) for k, t in found[0].items()}
                missing, unexpected = layer.load_state_dict(weights, strict=False)
                if unexpected or [m for m in missing if m.startswith(trained_prefixes(part))]:
                    raise ValueError(f"BLD checkpoint of layer {i} {part} {variant_name(v)} does not fit; "
                                     "delete it and rerun puzzle_bld")
        rows.append({"layer": i, "block": block.describe(), "trained": trained})
    return graph.eval(), rows


# ----------------------------------------------------------------------------- training
def _lr(step: int, total: int, cfg: GKDConfig) -> float:
    if total <= 1:
        return cfg.lr
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / (total - 1))))


def train_gkd(teacher: ModelGraph, student: ModelGraph, tokens: torch.Tensor, cfg: GKDConfig,
              folder: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Distil `teacher` into `student` (in place) on windows tokens [N, S] for cfg.tokens tokens.
    -> {"steps", "tokens", "history": [{step, tokens, loss, cosine, kl, lm}], "resumed_from", "seconds"}"""
    if len(teacher.model.layers) != len(student.model.layers):
        raise ValueError("GKD matches hidden states layer by layer: the student must keep the teacher's layer count")
    device = next(student.parameters()).device
    total = math.ceil(cfg.tokens / (cfg.batch_size * tokens.shape[1])) if cfg.tokens else 0
    teacher.eval()  # its forward runs under no_grad; its requires_grad flags are the caller's and stay as they are
    # every student weight learns, whatever flags the copied parent had (an earlier stage may have frozen it)
    student.requires_grad_(True)
    params = dict(student.named_parameters())  # tied weights appear once
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "tokens": 0, "history": []}
    # a zero mse_weight is left out so checkpoints written before that field existed still resume
    skip = {"tokens", "checkpoint_every"} | ({"mse_weight"} if not cfg.mse_weight else set())
    identity = {"config": cfg.model_dump(exclude=skip), "steps": total,  # the lr schedule depends on it
                "blocks": [b.describe() for b in blocks(student)], "tokens": _digest(tokens),
                # the starting weights: a retrained block library or another pruning with the same shapes must not
                # resume this run's checkpoint
                "init": _fingerprint(params)}
    ckpt = Path(folder) / f"checkpoint-{_digest(identity)}" if folder is not None else None
    if ckpt is not None and (ckpt / "state.json").exists():
        state = _load(ckpt, identity, params, opt)
    resumed_from = state["step"]
    progress = progress or (lambda label, done, total: None)
    label = f"GKD: {total} steps of {cfg.batch_size}x{tokens.shape[1]} tokens"
    t0 = time.perf_counter()
    student.train()
    while state["step"] < total:
        step = state["step"]
        g = torch.Generator().manual_seed(cfg.seed + step)
        ids = tokens[torch.randint(0, len(tokens), (cfg.batch_size,), generator=g)].to(device)  # [B, S]
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=True)
        s_out = student(ids, output_hidden_states=True)
        loss, parts = gkd_loss(t_out.hidden_states, s_out.hidden_states, t_out.logits, s_out.logits, ids, cfg)
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        state["step"] += 1
        state["tokens"] += ids.numel()
        state["history"].append({"step": state["step"], "tokens": state["tokens"], "loss": loss.item(), **parts})
        progress(label, state["step"], total)
        if ckpt is not None and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == total):
            _save(ckpt, identity, params, opt, state)
    student.eval()
    return {**state, "resumed_from": resumed_from, "seconds": time.perf_counter() - t0,
            "protocol": f"{cfg.tokens} token budget, {len(tokens)} windows of {tokens.shape[1]} tokens sampled "
                        f"with replacement; loss = {cfg.cosine_weight} cosine + {cfg.mse_weight} MSE + "
                        f"{cfg.kl_weight} KL + "
                        f"{cfg.lm_weight} LM"}


def _fingerprint(params: dict[str, torch.Tensor]) -> str:
    """A digest of the weights' names, shapes, sums and absolute sums to 6 significant digits: it tells one
    starting point from another without hashing every byte, and ignores last-bit noise of a rebuilt model."""
    with torch.no_grad():
        rows = [[name, list(p.shape), f"{p.double().sum().item():.6g}", f"{p.double().abs().sum().item():.6g}"]
                for name, p in params.items()]
    return _digest(rows)


def _digest(obj) -> str:
    data = obj.numpy().tobytes() if torch.is_tensor(obj) else json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:12]


def _save(folder: Path, identity: dict, params: dict, opt, state: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().contiguous().cpu() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"optim.{n}.{k}"] = v.detach().contiguous().cpu()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"identity": identity, **state}))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def _load(folder: Path, identity: dict, params: dict, opt) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("identity") != identity:
        raise ValueError(f"{folder} holds a GKD run of another model or with other settings; delete it or use "
                         "another work folder")
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            if f"model.{n}" not in tensors:
                raise ValueError(f"{folder} does not match the assembled model (no {n}); delete it")
            p.copy_(tensors[f"model.{n}"])
            st = {k.rsplit(".", 1)[1]: v if k.endswith(".step") else v.to(p.device)  # Adam's step stays on CPU
                  for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
            if st:
                opt.state[p] = st
    return {k: meta[k] for k in ("step", "tokens", "history")}
