"""Recovery by distillation of a compressed model from its dense teacher: local, then global.

The student's decoder linears become fake-quant modules (FakeQuantLinear; DiffQuantLinear for int4 with
`quantizer: differentiable`) whose masks stay fixed while their latent weights and scales learn; at the
end of each phase they are exported back to the deployable formats they came from.

1. Local (per decoder layer, one layer of each model in memory at a time, like oneshot.calibrate):
   the teacher's layer inputs X_t are propagated through the dense teacher, its outputs Y_t = L_t(X_t)
   are the targets, and the student's layer i (fake-quant) minimises hidden_loss(L_s(X), Y_t) for
   `local_steps` steps, where X is X_t ("teacher" inputs: layers independent, parallel) or the inputs
   propagated through the student's already recovered layers ("student": corrects accumulated error).
   A layer step costs about 1/L of a model step, so most of the budget can go here.
2. Global (end to end, the whole student): kl_weight * KL(teacher || student logits, temperature T)
   + hidden_weight * mean over `hidden_layers` of the per-layer hidden-state loss, for `global_steps`.
AdamW; gradient-norm clipping; budgets in steps and/or tokens (whichever ends first). Every
`checkpoint_every` steps and at each layer's end the decoder state and optimiser go to `checkpoint/`
(safetensors + JSON); a rerun with the same settings, model and data resumes there, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from llmcompress.oneshot.calibrate import LINEAR_TYPES, first_layer_inputs
from llmcompress.recover.diffq import DiffQuantLinear
from llmcompress.recover.fakequant import FakeQuantLinear
from llmcompress.recover.losses import HiddenLoss, distill_loss, hidden_loss, kl_logits

Progress = Callable[[str, int, int], None]
TRAINABLE = (FakeQuantLinear, DiffQuantLinear)


class RecoverConfig(BaseModel):
    """How a compressed model is recovered. These fields are the `distill` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(128, gt=0, description="training sequences")
    seq_len: int = Field(512, gt=1, description="tokens per training sequence")
    batch_size: int = Field(4, gt=0, description="sequences per step (local and global)")
    quantizer: Literal["ste", "differentiable"] = Field(
        "ste", description="int4 layers: uniform grid with learnable scales (ste), or learnable levels per group "
                           "(differentiable, Polino et al.), re-fitted to the uniform grid on export")
    soft_temperature: float | None = Field(None, gt=0, description="differentiable: soft-assignment temperature "
                                                                   "of the backward (None: hard assignment)")
    train_weights: bool = Field(True, description="learn the latent weights (else only scales / levels)")
    # scales are as large as the weights of their group, so Adam's per-step change of ~lr moves every
    # weight of a group by lr/scale of itself: far more than the same lr moves a latent weight's code
    # (measured on SmolLM2 layer 5, int4 g64, 60 local steps: held-out layer error 0.0037 -> 0.0043 with
    # 1.0, -> 0.0020 with 0.03 at local_lr 1e-3)
    scale_lr_mult: float = Field(0.03, gt=0, description="learning rate of scales / levels, as a multiple of the "
                                                         "phase's weight learning rate")
    local_steps: int | None = Field(50, ge=0, description="local phase: steps per decoder layer (0: skip it)")
    local_tokens: int | None = Field(None, gt=0, description="local phase: tokens per layer (whichever ends first)")
    local_lr: float = Field(1e-3, gt=0, description="local phase learning rate (one layer against fixed targets: "
                                                    "an order of magnitude above the global phase's)")
    local_loss: HiddenLoss = Field("mse", description="layer output vs the teacher's: mse (relative) or cosine")
    local_inputs: Literal["teacher", "student"] = Field(
        "student", description="layer inputs: the teacher's (layers independent) or propagated through the "
                               "recovered student layers")
    global_steps: int | None = Field(100, ge=0, description="global phase: steps (0: skip it)")
    global_tokens: int | None = Field(None, gt=0, description="global phase: tokens (whichever ends first)")
    lr: float = Field(1e-5, gt=0, description="global phase learning rate")
    temperature: float = Field(1.0, gt=0, description="logit KL temperature")
    kl_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.1, ge=0, description="weight of the per-layer hidden-state loss")
    hidden_loss: HiddenLoss = "mse"
    hidden_layers: list[int] | None = Field(None, description="decoder layers whose outputs are matched "
                                                              "(None: all)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(25, gt=0, description="steps between training checkpoints")
    seed: int = 0
    device: str | None = Field(None, description="device of the layer being trained locally (default: the model's)")

    @model_validator(mode="after")
    def _check(self):
        if self.local_steps is None and self.local_tokens is None:
            raise ValueError("give the local phase a budget: local_steps or local_tokens (local_steps: 0 skips it)")
        if self.global_steps is None and self.global_tokens is None:
            raise ValueError("give the global phase a budget: global_steps or global_tokens (global_steps: 0 skips it)")
        if self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("kl_weight and hidden_weight are both 0: the global phase has no loss")
        return self

    def steps(self, phase: str) -> int:
        """A phase's budget in steps (tokens are counted as batch_size * seq_len per step)."""
        steps, tokens = (self.local_steps, self.local_tokens) if phase == "local" else \
            (self.global_steps, self.global_tokens)
        by_tokens = math.ceil(tokens / (self.batch_size * self.seq_len)) if tokens is not None else None
        return min(s for s in (steps, by_tokens) if s is not None)


# ----------------------------------------------------------------------------- modules
def decoder_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {f"{prefix}{n}": m for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES + TRAINABLE)}


def make_trainable(module: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """A deployable linear -> its fake-quant form (learnable levels for int4 with the differentiable quantizer)."""
    fake = FakeQuantLinear.from_module(module)
    if cfg.quantizer == "differentiable" and fake.fmt in ("int4", "sparse24_int4"):
        return DiffQuantLinear(fake, cfg.soft_temperature)
    return fake


def to_trainable(root: nn.Module, cfg: RecoverConfig) -> None:
    """Swap every linear under root for its trainable form, in place; everything else is frozen."""
    root.requires_grad_(False)
    for name, m in decoder_linears(root).items():
        if not isinstance(m, TRAINABLE):
            root.set_submodule(name, make_trainable(m, cfg))
    for m in root.modules():
        if isinstance(m, FakeQuantLinear):
            m.weight.requires_grad_(cfg.train_weights)
            if m.scale is not None:
                m.scale.requires_grad_(True)
        elif isinstance(m, DiffQuantLinear):
            m.levels.requires_grad_(True)


def export_all(root: nn.Module) -> None:
    """Swap every trainable linear under root back to its deployable module, in place."""
    for name, m in list(root.named_modules()):
        if isinstance(m, TRAINABLE):
            root.set_submodule(name, m.export())


def _optimizer(root: nn.Module, lr: float, cfg: RecoverConfig) -> tuple[torch.optim.Optimizer, dict]:
    named = {n: p for n, p in root.named_parameters() if p.requires_grad}
    quant = {n for n in named if n.endswith((".scale", ".levels"))}
    groups = [{"params": [named[n] for n in named if n not in quant], "lr": lr},
              {"params": [named[n] for n in named if n in quant], "lr": lr * cfg.scale_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the model has no decoder linears (or train_weights is off on a model "
                         "without scales)")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay), named


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: dict, cfg: RecoverConfig) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
    opt.step()


def _batch(n: int, cfg: RecoverConfig, *key: int) -> torch.Tensor:
    """The seeded batch of a step: indices into the N training sequences."""
    seed = cfg.seed
    for k in key:
        seed = seed * 1_000_003 + k
    g = torch.Generator().manual_seed(seed % (2**63))
    return torch.randperm(n, generator=g)[: cfg.batch_size]


# ----------------------------------------------------------------------------- checks
def check_recoverable(student, teacher, cfg: RecoverConfig) -> None:
    """Refuse up front what would fail halfway."""
    ls, lt = len(student.model.layers), len(teacher.model.layers)
    if ls != lt:
        raise ValueError(f"the student has {ls} decoder layers and the teacher {lt}; recovery distils layer by "
                         "layer, so the teacher must be the model the student was compressed from")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"vocabularies differ (student {student.config.vocab_size}, teacher "
                         f"{teacher.config.vocab_size}); use the teacher the student was compressed from")
    bad = [i for i in cfg.hidden_layers or [] if not 0 <= i < ls]
    if bad:
        raise ValueError(f"hidden_layers {bad} do not exist; the model has layers 0..{ls - 1}")
    if not decoder_linears(student.model.layers):
        raise ValueError("the student has no decoder linears to recover")


# ----------------------------------------------------------------------------- the two phases
@torch.no_grad()
def _propagate(layer: nn.Module, xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int) -> torch.Tensor:
    """xs: [N, S, D] -> the layer's outputs [N, S, D], batch sequences at a time."""
    return torch.cat([layer(x, c, s, None, None) for x, c, s in zip(xs.split(batch), cos.split(batch),
                                                                     sin.split(batch))])


def _inputs(graph, tokens: torch.Tensor, cfg: RecoverConfig, device) -> tuple[torch.Tensor, ...]:
    """The first decoder layer's inputs of every sequence: (x [N, S, D], cos [N, S, hd], sin [N, S, hd])."""
    parts = first_layer_inputs(graph, tokens, cfg.batch_size, device)
    return tuple(torch.cat(t) for t in zip(*parts))


def _local(student, teacher, tokens, cfg: RecoverConfig, state: dict, ckpt, progress: Progress) -> None:
    home = next(student.parameters()).device
    device = torch.device(cfg.device) if cfg.device is not None else home
    steps, n_layers, n = cfg.steps("local"), len(student.model.layers), len(tokens)
    xt, cos, sin = _inputs(teacher, tokens, cfg, device)
    xs = _inputs(student, tokens, cfg, device)[0] if cfg.local_inputs == "student" else None
    for i in range(n_layers):
        t_layer, s_layer = teacher.model.layers[i].to(device), student.model.layers[i].to(device)
        yt = _propagate(t_layer, xt, cos, sin, cfg.batch_size)  # [N, S, D]: the targets
        if i >= state["layer"]:
            x = xs if xs is not None else xt
            to_trainable(s_layer, cfg)
            opt, params = _optimizer(s_layer, cfg.local_lr, cfg)
            if state.get("resume") is not None:
                _load_optimizer(opt, params, state.pop("resume"))
            while state["step"] < steps:
                idx = _batch(n, cfg, i, state["step"])
                out = s_layer(x[idx], cos[idx], sin[idx], None, None)
                loss = hidden_loss(cfg.local_loss, out, yt[idx])
                _step(loss, opt, params, cfg)
                state["step"] += 1
                state["tokens"] += idx.numel() * tokens.shape[1]
                state["history"].append({"phase": "local", "layer": i, "step": state["step"], "loss": loss.item()})
                if ckpt is not None and state["step"] % cfg.checkpoint_every == 0 and state["step"] < steps:
                    _save(ckpt, student, state, opt, params)
                progress("local distillation", i * steps + state["step"], n_layers * steps)
            export_all(s_layer)
            state["layer"], state["step"] = i + 1, 0
            if ckpt is not None:
                _save(ckpt, student, state)
        if xs is not None:
            xs = _propagate(s_layer, xs, cos, sin, cfg.batch_size)
        xt = yt
        t_layer.to(home), s_layer.to(home)
        progress("local distillation", (i + 1) * steps, n_layers * steps)


def _global(student, teacher, tokens, cfg: RecoverConfig, state: dict, ckpt, progress: Progress) -> None:
    device = next(student.parameters()).device
    steps, n = cfg.steps("global"), len(tokens)
    layers = list(range(len(student.model.layers))) if cfg.hidden_layers is None else cfg.hidden_layers
    use_hidden = cfg.hidden_weight > 0 and bool(layers)
    to_trainable(student.model.layers, cfg)
    opt, params = _optimizer(student.model.layers, cfg.lr, cfg)
    if state.get("resume") is not None:
        _load_optimizer(opt, params, state.pop("resume"))
    teacher.eval()
    while state["step"] < steps:
        idx = _batch(n, cfg, 1_000_000, state["step"])
        batch = tokens[idx].to(device)  # [B, S]
        with torch.no_grad():
            t_out = teacher(batch, output_hidden_states=use_hidden)
        s_out = student(batch, output_hidden_states=use_hidden)
        pick = (lambda hs: [hs[i + 1] for i in layers]) if use_hidden else (lambda hs: [])
        loss, parts = distill_loss(s_out.logits, t_out.logits, pick(s_out.hidden_states),
                                   pick(t_out.hidden_states), temperature=cfg.temperature,
                                   kl_weight=cfg.kl_weight, hidden_weight=cfg.hidden_weight, hidden=cfg.hidden_loss)
        _step(loss, opt, params, cfg)
        state["step"] += 1
        state["tokens"] += batch.numel()
        state["history"].append({"phase": "global", "step": state["step"], "loss": loss.item(), **parts})
        if ckpt is not None and state["step"] % cfg.checkpoint_every == 0 and state["step"] < steps:
            _save(ckpt, student, state, opt, params)
        progress("global distillation", state["step"], steps)
    export_all(student.model.layers)


@torch.no_grad()
def logit_kl(student, teacher, tokens: torch.Tensor, batch_size: int = 4) -> float:
    """Mean KL(teacher || student) of the next-token distributions over tokens [N, S]."""
    device = next(student.parameters()).device
    total = 0.0
    for b in tokens.split(batch_size):
        b = b.to(device)
        total += kl_logits(student(b).logits, teacher(b).logits).item() * len(b)
    return total / len(tokens)


def recover(student, teacher, tokens: torch.Tensor, cfg: RecoverConfig, checkpoint: str | Path | None = None,
            progress: Progress | None = None) -> dict:
    """Recover `student` (a compressed graph, changed in place) towards its dense `teacher` on tokens [N, S].

    With `checkpoint`, training state is written there and a rerun with the same settings resumes.
    -> report (budgets, losses, KL on the first training batch before and after)."""
    check_recoverable(student, teacher, cfg)
    progress = progress or (lambda label, done, total: None)
    tokens = tokens[:, : cfg.seq_len]
    teacher.eval().requires_grad_(False)
    student.eval().requires_grad_(False)  # to_trainable turns on exactly what learns
    probe = tokens[: cfg.batch_size]
    ckpt = Path(checkpoint) if checkpoint is not None else None
    identity = _identity(student, tokens, cfg)
    state = {"phase": "local", "layer": 0, "step": 0, "tokens": 0, "history": [], "kl_before": None}
    if ckpt is not None and (ckpt / "state.json").exists():
        state = _load(ckpt, student, identity, cfg)
    state["identity"] = identity
    if state["kl_before"] is None:
        state["kl_before"] = logit_kl(student, teacher, probe, cfg.batch_size)
    if state["phase"] == "local":
        if cfg.steps("local") > 0:
            _local(student, teacher, tokens, cfg, state, ckpt, progress)
        state |= {"phase": "global", "step": 0}
        if ckpt is not None:
            _save(ckpt, student, state)
    if state["phase"] == "global":
        if cfg.steps("global") > 0:
            _global(student, teacher, tokens, cfg, state, ckpt, progress)
        state["phase"] = "done"
        state["kl_after"] = logit_kl(student, teacher, probe, cfg.batch_size)
        if ckpt is not None:
            _save(ckpt, student, state)
    student.requires_grad_(False)
    return _report(state, cfg, tokens)


def _report(state: dict, cfg: RecoverConfig, tokens: torch.Tensor) -> dict:
    hist = state["history"]
    local = [h for h in hist if h["phase"] == "local"]
    glob = [h for h in hist if h["phase"] == "global"]
    per_layer = {}
    for h in local:
        per_layer.setdefault(h["layer"], []).append(h["loss"])
    mean = lambda rows, k="loss": sum(r[k] for r in rows) / len(rows) if rows else None  # noqa: E731
    return {
        "quantizer": cfg.quantizer,
        "train_sequences": f"{len(tokens)} sequences of {tokens.shape[1]} tokens",
        "local": {"steps_per_layer": cfg.steps("local"), "loss": cfg.local_loss, "inputs": cfg.local_inputs,
                  "first_loss": {str(k): v[0] for k, v in per_layer.items()},
                  "last_loss": {str(k): v[-1] for k, v in per_layer.items()}},
        "global": {"steps": cfg.steps("global"), "loss_first": mean(glob[:10]), "loss_last": mean(glob[-10:]),
                   "kl_last": mean(glob[-10:], "kl")},
        "tokens": state["tokens"],
        "kl_before": state["kl_before"], "kl_after": state.get("kl_after"),
        "kl_protocol": f"KL(teacher || student) on the first {cfg.batch_size} training sequences",
    }


# ----------------------------------------------------------------------------- checkpoints (safetensors + JSON)
def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _identity(student, tokens: torch.Tensor, cfg: RecoverConfig) -> str:
    """What a checkpoint must share to be resumed: settings (not the cadence or device), input model, data."""
    settings = cfg.model_dump(exclude={"checkpoint_every", "device"})
    state = _fingerprint(dict(student.model.layers.state_dict()))
    return hashlib.sha256(json.dumps([settings, state, _fingerprint({"tokens": tokens})], sort_keys=True)
                          .encode()).hexdigest()


def _save(folder: Path, student, state: dict, opt=None, params: dict | None = None) -> None:
    """The decoder layers (whatever form they are in now), the optimiser and the counters, atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    layers = student.model.layers
    trainable = sorted({int(n.split(".")[0]) for n, m in layers.named_modules() if isinstance(m, TRAINABLE)})
    tensors = {f"layers.{k}": v.detach().contiguous() for k, v in layers.state_dict().items()}
    if opt is not None:
        for name, p in params.items():
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"optim.{name}.{k}"] = v.detach().contiguous()
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    meta = {k: v for k, v in state.items() if k != "resume"} | {"trainable_layers": trainable,
                                                                  "has_optimizer": opt is not None}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _load(folder: Path, student, identity: str, cfg: RecoverConfig) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("identity") != identity:
        raise ValueError(f"{folder} holds a recovery run of another model, data or configuration; remove it or "
                         "choose another checkpoint folder")
    tensors = load_file(str(folder / "state.safetensors"))
    layers = student.model.layers
    for i in meta["trainable_layers"]:
        to_trainable(layers[i], cfg)
    layers.load_state_dict({k[len("layers."):]: v for k, v in tensors.items() if k.startswith("layers.")},
                           strict=True)
    state = {k: v for k, v in meta.items() if k not in ("trainable_layers", "has_optimizer")}
    if meta["has_optimizer"]:
        state["resume"] = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    return state


def _load_optimizer(opt: torch.optim.Optimizer, params: dict, saved: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        st = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in saved.items() if k.rsplit(".", 1)[0] == name}
        if st:
            opt.state[p] = st


__all__ = ["RecoverConfig", "check_recoverable", "export_all", "logit_kl", "make_trainable", "recover", "to_trainable"]
