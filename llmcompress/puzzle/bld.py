"""Blockwise local distillation (BLD): train every library variant to imitate the parent layer it replaces.

1. The parent's activations are captured once on the training tokens: the input of every layer h_i, the
   residual stream after its attention half m_i, and its output h_{i+1} (each [N, S, D]). They stay in
   memory, or, when they exceed `memory_limit_mb`, go to `<folder>/activations/` as one safetensors file
   per tensor, read back a batch slice at a time (memory-mapped).
2. Decoupled training: an attention variant is trained inside a layer whose FFN is the parent's (frozen),
   from h_i to h_{i+1}; an FFN variant after the parent's attention, from m_i to h_{i+1}. So a layer costs
   (attention variants + FFN variants) trainings, not their product. Parent and no-op variants need none.
   Loss: normalised MSE(o_parent, o_child) / MSE(o_parent, 0); AdamW with a cosine schedule; the trained
   part's norm is trained with it.
3. Each variant trains on a budget of `tokens`; its weights go to `<folder>/blocks/L<i>.<part>.<variant>.safetensors`
   (with the normalised MSE before and after on `eval_samples` sequences held out of training). A finished
   block is never trained again: an interrupted run resumes at the first missing block. The checkpoint
   records a key of the library and the settings; a changed one is retrained.
Blocks are independent: `workers` > 1 trains them in a process pool (activations then go to disk), and
`rank`/`world_size` split them across torchrun processes.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmcompress.models.graph import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelGraph,
    _attention_init,
    _ffn_init,
)
from llmcompress.models.modeling_llmcompress import DecoderLayer, LlmcNasConfig
from llmcompress.oneshot.calibrate import first_layer_inputs
from llmcompress.puzzle.library import NOOP_ATTENTION, PARTS, BlockLibrary, Part, variant_name

Progress = Callable[[str, int, int], None]


class BLDConfig(BaseModel):
    """How blocks are distilled. These fields are the `puzzle_bld` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(8192, ge=0, description="training tokens per block (budget); 0 keeps the initialisation")
    num_samples: int = Field(64, gt=0, description="training sequences whose activations are captured")
    eval_samples: int = Field(4, ge=1, description="of those, sequences held out to measure the normalised MSE")
    batch_size: int = Field(4, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine schedule ends at lr * this")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    memory_limit_mb: float = Field(2048, ge=0, description="captured activations above this go to disk")
    workers: int = Field(1, gt=0, description="train blocks in a process pool of this size")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.eval_samples >= self.num_samples:
            raise ValueError(f"eval_samples={self.eval_samples} leaves no training sequence of num_samples="
                             f"{self.num_samples}; raise num_samples")
        return self

    def identity(self) -> dict:
        """The settings a block checkpoint depends on (not how it is run)."""
        return self.model_dump(exclude={"memory_limit_mb", "workers"})


# ----------------------------------------------------------------------------- math (pure)
def normalized_mse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """MSE(target, pred) / MSE(target, 0) over all elements -> scalar."""
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(eps)


def num_steps(tokens: int, batch_size: int, seq_len: int) -> int:
    """Steps that spend a token budget (at least one step for a positive budget)."""
    return math.ceil(tokens / (batch_size * seq_len)) if tokens > 0 else 0


def cosine_lr(step: int, total: int, lr: float, min_ratio: float) -> float:
    """Learning rate at `step` of `total`: cosine from lr down to lr * min_ratio."""
    if total <= 1:
        return lr
    w = 0.5 * (1 + math.cos(math.pi * step / (total - 1)))
    return lr * (min_ratio + (1 - min_ratio) * w)


# ----------------------------------------------------------------------------- activations
class ActivationStore:
    """Named [N, S, D] tensors in memory, or one safetensors file each under `folder`."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.mem: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        if self.folder is None:
            self.mem[name] = t
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        save_file({"x": t.contiguous().cpu()}, str(tmp))
        os.replace(tmp, self.folder / f"{name}.safetensors")

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of a tensor (only those rows are read from disk)."""
        if self.folder is None:
            return self.mem[name][start:stop]
        with safe_open(str(self.folder / f"{name}.safetensors"), framework="pt") as f:
            return f.get_slice("x")[start:stop]

    def rows(self, name: str) -> int:
        if self.folder is None:
            return self.mem[name].shape[0]
        with safe_open(str(self.folder / f"{name}.safetensors"), framework="pt") as f:
            return f.get_slice("x").get_shape()[0]

    def layer(self, i: int, part: Part) -> tuple[str, str]:
        """Names of (input, target) for training a `part` variant of layer i."""
        return (f"h{i}" if part == "attention" else f"m{i}"), f"h{i + 1}"


def activation_bytes(num_layers: int, n: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """h_0..h_L and m_0..m_{L-1}: (2L + 1) tensors of [n, seq_len, hidden]."""
    return (2 * num_layers + 1) * n * seq_len * hidden * torch.empty((), dtype=dtype).element_size()


def _tokens_key(graph: ModelGraph, tokens: torch.Tensor) -> str:
    h = hashlib.sha256(tokens.numpy().tobytes())
    for _, p in list(graph.named_parameters())[:4]:
        h.update(p.detach().float().flatten()[:1024].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def capture(graph: ModelGraph, tokens: torch.Tensor, store: ActivationStore, batch_size: int = 4, device=None,
            progress: Progress | None = None) -> None:
    """Run the parent once over tokens [N, S], filling `store` with h_i, m_i (see the module docstring) and
    the rotary tables rope_cos/rope_sin [1, S, hd]. A disk store already holding these tokens is reused."""
    key = _tokens_key(graph, tokens)
    marker = store.folder / "capture.json" if store.folder is not None else None
    if marker is not None and marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = first_layer_inputs(graph, tokens, batch_size, device)
    cos, sin = inputs[0][1][:1].cpu(), inputs[0][2][:1].cpu()
    store.put("rope_cos", cos)
    store.put("rope_sin", sin)
    store.put("h0", torch.cat([x for x, _, _ in inputs]).cpu())
    n = len(graph.model.layers)
    for i, layer in enumerate(graph.model.layers):
        layer.to(device)
        mids, outs = [], []
        for x, c, s in inputs:
            m = x + layer.self_attn(layer.input_layernorm(x), c, s, None, None)
            mids.append(m)
            outs.append(m + layer.mlp(layer.post_attention_layernorm(m)))
        layer.to(home)
        store.put(f"m{i}", torch.cat(mids).cpu())
        store.put(f"h{i + 1}", torch.cat(outs).cpu())
        inputs = [(o, c, s) for o, (_, c, s) in zip(outs, inputs)]
        if progress is not None:
            progress("capturing parent activations", i + 1, n)
    if marker is not None:
        marker.write_text(json.dumps({"key": key, "samples": len(tokens), "seq_len": tokens.shape[1]}))


# ----------------------------------------------------------------------------- child blocks
def trained_prefixes(part: Part) -> tuple[str, ...]:
    """State-dict prefixes of a DecoderLayer that a `part` variant owns (and BLD trains)."""
    return ("self_attn.", "input_layernorm.") if part == "attention" else ("mlp.", "post_attention_layernorm.")


def child_layer(parent: DecoderLayer, config: LlmcNasConfig, part: Part, variant: AttentionConfig | FFNConfig,
                channels: torch.Tensor | None = None) -> DecoderLayer:
    """The layer a variant is trained in, initialised from the parent layer (Puzzle's initialisations):
    attention variant + the parent's FFN (frozen), or a no-op attention + the FFN variant."""
    ref = next(parent.parameters())
    if part == "attention":
        ffn = FFNConfig(intermediate_size=parent.mlp.down_proj.in_features)
        block = BlockConfig(attention=variant, ffn=ffn)
    else:
        block = BlockConfig(attention=NOOP_ATTENTION, ffn=variant)
    layer = DecoderLayer(config, block.to_hf(config.hidden_size), 0).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if part == "attention":
            if layer.input_layernorm is not None:
                layer.input_layernorm.load_state_dict(parent.input_layernorm.state_dict())
            if layer.self_attn is not None:
                _attention_init(parent.self_attn, layer.self_attn, config)
            layer.post_attention_layernorm.load_state_dict(parent.post_attention_layernorm.state_dict())
            layer.mlp.load_state_dict(parent.mlp.state_dict())
            for p in (*layer.mlp.parameters(), *layer.post_attention_layernorm.parameters()):
                p.requires_grad_(False)
        elif layer.mlp is not None:
            layer.post_attention_layernorm.load_state_dict(parent.post_attention_layernorm.state_dict())
            _ffn_init(parent.mlp, layer.mlp, channels)
    return layer


def part_state(layer: DecoderLayer, part: Part) -> dict[str, torch.Tensor]:
    """The weights a variant owns, keyed as in a full DecoderLayer's state dict."""
    return {k: v for k, v in layer.state_dict().items() if k.startswith(trained_prefixes(part))}


def block_path(folder: Path, layer: int, part: Part, name: str) -> Path:
    return Path(folder) / "blocks" / f"L{layer:03d}.{part}.{name}.safetensors"


def read_block(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(weights, metadata) of a finished block checkpoint, or None if there is none."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("bld", "{}"))
    return load_file(str(path)), meta


def load_variant(parent: DecoderLayer, config: LlmcNasConfig, library: BlockLibrary, layer: int, part: Part,
                 variant: AttentionConfig | FFNConfig, folder: Path | None) -> tuple[DecoderLayer, bool]:
    """A variant's layer (see child_layer) with its BLD weights when `folder` holds them. -> (layer, trained)"""
    channels = library.channels(layer, variant) if part == "ffn" else None
    child = child_layer(parent, config, part, variant, channels)
    if variant.kind == "noop":  # nothing to train
        return child, True
    found = read_block(block_path(folder, layer, part, variant_name(variant))) if folder is not None else None
    if found is None:
        return child, False
    weights, _ = found
    missing, unexpected = child.load_state_dict(weights, strict=False)
    missing = [m for m in missing if m.startswith(trained_prefixes(part))]
    if missing or unexpected:
        raise ValueError(f"block checkpoint L{layer} {part} {variant_name(variant)} does not fit its variant "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); delete it and rerun BLD")
    return child, True


# ----------------------------------------------------------------------------- training one block
@dataclass
class BlockJob:
    layer: int
    part: Part
    variant: AttentionConfig | FFNConfig
    channels: torch.Tensor | None
    path: Path
    key: str


def _batches(n_train: int, offset: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """Full batches of contiguous rows (a disk store reads each as one slice), in a seeded order; the rows
    after the last full batch wait for another epoch's offset."""
    shift = seed % (n_train % batch_size + 1)
    starts = list(range(offset + shift, offset + n_train - batch_size + 1, batch_size))
    perm = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(starts[p], starts[p] + batch_size) for p in perm]


@torch.no_grad()
def _eval_nmse(layer: DecoderLayer, store: ActivationStore, src: str, dst: str, stop: int, batch_size: int,
               cos: torch.Tensor, sin: torch.Tensor, device) -> float:
    num, den = 0.0, 0.0
    for a in range(0, stop, batch_size):
        x, y = store.get(src, a, min(a + batch_size, stop)).to(device), store.get(dst, a, min(a + batch_size, stop))
        pred = layer(x, cos.expand(len(x), -1, -1), sin.expand(len(x), -1, -1), None, None).float().cpu()
        num += (pred - y.float()).pow(2).sum().item()
        den += y.float().pow(2).sum().item()
    return num / max(den, 1e-12)


def train_block(job: BlockJob, parent: DecoderLayer, config: LlmcNasConfig, store: ActivationStore,
                cfg: BLDConfig, device="cpu") -> dict:
    """Train one variant (see the module docstring) and write its checkpoint. -> its report row."""
    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(cfg.seed + 1000 * job.layer + PARTS.index(job.part))
    layer = child_layer(parent.to(device), config, job.part, job.variant, job.channels).float().train()
    src, dst = store.layer(job.layer, job.part)
    cos, sin = store.get("rope_cos").to(device), store.get("rope_sin").to(device)  # [1, S, hd]
    n = store.rows(dst)
    seq_len = cos.shape[1]
    before = _eval_nmse(layer, store, src, dst, cfg.eval_samples, cfg.batch_size, cos, sin, device)
    params = [p for name, p in layer.named_parameters() if name.startswith(trained_prefixes(job.part))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, n - cfg.eval_samples)
    total = num_steps(cfg.tokens, batch_size, seq_len)
    order: list[tuple[int, int]] = []
    tokens, losses = 0, []
    for step in range(total):
        if not order:
            order = _batches(n - cfg.eval_samples, cfg.eval_samples, batch_size, cfg.seed + step)
        a, b = order.pop()
        x, y = store.get(src, a, b).to(device).float(), store.get(dst, a, b).to(device).float()  # [B, S, D]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, cfg.lr, cfg.min_lr_ratio)
        pred = layer(x, cos.expand(len(x), -1, -1).float(), sin.expand(len(x), -1, -1).float(), None, None)
        loss = normalized_mse(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tokens += x.shape[0] * x.shape[1]
        losses.append(loss.item())
    layer.eval()
    after = _eval_nmse(layer, store, src, dst, cfg.eval_samples, cfg.batch_size, cos, sin, device)
    row = {"layer": job.layer, "part": job.part, "variant": variant_name(job.variant), "steps": total,
           "tokens": tokens, "nmse_init": before, "nmse": after, "train_loss_last": losses[-1] if losses else None,
           "seconds": time.perf_counter() - t0}
    ref_dtype = next(parent.parameters()).dtype
    weights = {k: v.detach().to(ref_dtype).contiguous().cpu() for k, v in part_state(layer, job.part).items()}
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_name(f".{job.path.name}.tmp-{os.getpid()}")
    save_file(weights, str(tmp), metadata={"bld": json.dumps({"key": job.key, **row})})
    os.replace(tmp, job.path)
    return row


def _pool_job(job: BlockJob, parent_state: dict, config: dict, layer_block: dict, folder: str, cfg: dict,
              device: str, threads: int) -> dict:
    """A process-pool worker: rebuild the parent layer, then train_block."""
    torch.set_num_threads(threads)
    conf = LlmcNasConfig(**config)
    parent = DecoderLayer(conf, layer_block, 0)
    parent.load_state_dict(parent_state)
    return train_block(job, parent.to(next(iter(parent_state.values())).dtype), conf, ActivationStore(Path(folder)),
                       BLDConfig(**cfg), device)


# ----------------------------------------------------------------------------- driver
def block_key(library: BlockLibrary, cfg: BLDConfig, layer: int, part: Part, name: str, seq_len: int) -> str:
    text = json.dumps([library.fingerprint(), cfg.identity(), layer, part, name, seq_len], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def jobs_for(library: BlockLibrary, cfg: BLDConfig, folder: Path, seq_len: int,
             layers: list[int] | None = None) -> list[BlockJob]:
    """Every variant that needs training (not the parent, not no-op), layer by layer."""
    out = []
    for i in (layers if layers is not None else range(library.num_layers)):
        for part in PARTS:
            for v in library.variants(part):
                if v == library.parent_part(part) or v.kind == "noop":
                    continue
                name = variant_name(v)
                out.append(BlockJob(i, part, v, library.channels(i, v) if part == "ffn" else None,
                                    block_path(folder, i, part, name), block_key(library, cfg, i, part, name, seq_len)))
    return out


def run_bld(graph: ModelGraph, library: BlockLibrary, tokens: torch.Tensor, cfg: BLDConfig, folder: str | Path,
            device=None, rank: int = 0, world_size: int = 1, layers: list[int] | None = None,
            progress: Progress | None = None) -> dict:
    """Capture the parent's activations on tokens [N, S] and train every variant's block (see the module
    docstring); this rank trains jobs rank, rank + world_size, ... Finished blocks are skipped.
    -> {"blocks": [row per block], "trained": n, "resumed": n, "store": "memory" | path, ...}"""
    if len(tokens) != cfg.num_samples:
        raise ValueError(f"BLD was given {len(tokens)} sequences but num_samples={cfg.num_samples}; "
                         "use more data or lower num_samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    folder = Path(folder)
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    progress = progress or (lambda label, done, total: None)
    seq_len = tokens.shape[1]
    jobs = jobs_for(library, cfg, folder, seq_len, layers)[rank::world_size]
    todo, rows = [], []
    for job in jobs:
        found = read_block(job.path)
        if found is not None and found[1].get("key") == job.key:
            rows.append({**{k: v for k, v in found[1].items() if k != "key"}, "resumed": True})
        else:
            todo.append(job)
    need = activation_bytes(library.num_layers, len(tokens), seq_len, graph.config.hidden_size,
                            next(graph.parameters()).dtype)
    on_disk = need > cfg.memory_limit_mb * 2**20 or cfg.workers > 1
    store = ActivationStore(folder / "activations" if on_disk else None)
    t0 = time.perf_counter()
    if todo:
        capture(graph, tokens, store, cfg.batch_size, device, progress)
    label = f"BLD: training {len(todo)} blocks ({len(jobs) - len(todo)} already done)"
    progress(label, 0, len(todo))
    layers_mod = graph.model.layers
    if cfg.workers == 1:
        for k, job in enumerate(todo):
            parent = copy.deepcopy(layers_mod[job.layer])
            rows.append({**train_block(job, parent, graph.config, store, cfg, device), "resumed": False})
            progress(label, k + 1, len(todo))
    elif todo:
        import torch.multiprocessing as mp

        threads = max(1, torch.get_num_threads() // cfg.workers)
        config = graph.config.to_dict()
        with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_pool_job, job, {k: v.cpu() for k, v in layers_mod[job.layer].state_dict().items()},
                                   config, graph.config.block_configs[job.layer], str(store.folder), cfg.model_dump(),
                                   str(device), threads) for job in todo]
            for k, fut in enumerate(concurrent.futures.as_completed(futures)):
                rows.append({**fut.result(), "resumed": False})
                progress(label, k + 1, len(todo))
    rows.sort(key=lambda r: (r["layer"], PARTS.index(r["part"]), r["variant"]))
    trained = [r for r in rows if not r["resumed"]]
    return {
        "blocks": rows, "trained": len(trained), "resumed": len(rows) - len(trained),
        "store": str(store.folder) if store.folder is not None else "memory",
        "activation_mb": need / 2**20, "tokens_per_block": cfg.tokens, "seconds": time.perf_counter() - t0,
        "protocol": f"{cfg.num_samples - cfg.eval_samples} training sequences of {seq_len} tokens, "
                    f"normalised MSE on {cfg.eval_samples} held-out sequences before/after",
    }
