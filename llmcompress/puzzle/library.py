"""Puzzle's block library: the per-layer alternatives of the parent's attention and FFN.

Attention: the parent; fewer KV heads (all query heads kept, K/V projections mean-pooled within the
merged groups); a single linear layer (W_O · W_V: each token attends to itself); no-op.
FFN: the parent; intermediate sizes at `ffn_fractions` of the parent's, keeping the channels with the
largest contribution |X_i| · ||W_down[:, i]|| on calibration data (|X_i|: RMS over calibration tokens of
down_proj's input channel i); a single linear layer (W_down · W_up); no-op.
The vocabulary is the same for every layer; the channel ranking is per layer.

Saved as `<folder>/library.json` (the variants) and `<folder>/channels.safetensors` (ranking, importance).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file

from llmcompress.hardware.profile import attention_variant, ffn_sizes, ffn_variant
from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, ModelGraph, blocks, parent_block
from llmcompress.oneshot.calibrate import capture_inputs, first_layer_inputs

Part = Literal["attention", "ffn"]
PARTS: tuple[Part, Part] = ("attention", "ffn")
NOOP_ATTENTION = AttentionConfig(kind="noop")
NOOP_FFN = FFNConfig(kind="noop")


class LibraryConfig(BaseModel):
    """Which variants the library holds. These fields are the `puzzle_library` stage's recipe section."""

    model_config = ConfigDict(extra="forbid")
    ffn_fractions: list[float] = Field([0.875, 0.75, 0.5, 0.25, 0.1],
                                       description="FFN intermediate sizes as fractions of the parent's")
    kv_heads: list[int] | None = Field(None, description="KV-head counts of the reduced attention variants "
                                       "(default: every divisor of the parent's below it)")
    linear: bool = Field(True, description="include the single-linear-layer attention and FFN")
    noop: bool = Field(True, description="include the no-op attention and FFN")
    multiple: int = Field(8, gt=0, description="FFN sizes are rounded to a multiple of this")
    num_samples: int = Field(16, gt=0, description="calibration sequences for the FFN channel importance")
    batch_size: int = Field(4, gt=0)

    @field_validator("ffn_fractions")
    @classmethod
    def _fractions(cls, v):
        if not all(0 < f < 1 for f in v):
            raise ValueError(f"ffn_fractions must lie in (0, 1) (the parent's size is always included), got {v}")
        return v


def variant_name(variant: AttentionConfig | FFNConfig) -> str:
    """The cost table's name of a variant: gqa_<H>q_<KV>kv, mlp_<I>, linear or noop."""
    return attention_variant(variant) if isinstance(variant, AttentionConfig) else ffn_variant(variant)


# ----------------------------------------------------------------------------- vocabulary (pure)
def attention_library(parent: AttentionConfig, kv_heads: list[int] | None = None, linear: bool = True,
                      noop: bool = True) -> list[AttentionConfig]:
    """The parent first, then fewer KV heads (most first), linear, no-op."""
    if kv_heads is None:
        kv_heads = [k for k in range(parent.num_kv_heads - 1, 0, -1) if parent.num_kv_heads % k == 0]
    bad = [k for k in kv_heads if not (0 < k < parent.num_kv_heads and parent.num_kv_heads % k == 0)]
    if bad:
        raise ValueError(f"kv_heads {bad} cannot be pooled from the parent's {parent.num_kv_heads} KV heads; "
                         "use divisors of it below it")
    out = [parent] + [AttentionConfig(num_heads=parent.num_heads, num_kv_heads=k) for k in sorted(set(kv_heads),
                                                                                                   reverse=True)]
    return out + ([AttentionConfig(kind="linear")] if linear else []) + ([NOOP_ATTENTION] if noop else [])


def ffn_library(parent: FFNConfig, fractions: list[float], linear: bool = True, noop: bool = True,
                multiple: int = 8) -> list[FFNConfig]:
    """The parent first, then smaller intermediate sizes (largest first), linear, no-op."""
    sizes = [s for s in ffn_sizes(parent.intermediate_size, fractions, multiple) if s < parent.intermediate_size]
    out = [parent] + [FFNConfig(intermediate_size=s) for s in sizes]
    return out + ([FFNConfig(kind="linear")] if linear else []) + ([NOOP_FFN] if noop else [])


def channel_importance(act_rms: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """|X_i| · ||W_down[:, i]||. act_rms: [I] (RMS of down_proj's input channel i), w_down: [D, I] -> [I]"""
    return act_rms * w_down.float().norm(dim=0)


def top_channels(order: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most important channels, in their original order. order: [I] by decreasing importance."""
    if not 0 < size <= order.numel():
        raise ValueError(f"cannot keep {size} of {order.numel()} FFN channels")
    return order[:size].sort().values


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def ffn_importance(graph: ModelGraph, tokens: torch.Tensor, batch_size: int = 4, device=None,
                   progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """Channel importance of every layer's parent FFN on calibration tokens [N, S]. -> [L, I]"""
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = first_layer_inputs(graph, tokens, batch_size, device)
    rows, n = [], len(graph.model.layers)
    for i, layer in enumerate(graph.model.layers):
        layer.to(device)
        with capture_inputs({"down": layer.mlp.down_proj}, hessian=False) as stats:
            inputs = [(layer(x, cos, sin, None, None), cos, sin) for x, cos, sin in inputs]
        s = stats["down"]
        rows.append(channel_importance((s.sqnorm / max(s.n, 1)).sqrt(), layer.mlp.down_proj.weight).cpu())
        layer.to(home)
        if progress is not None:
            progress("FFN channel importance", i + 1, n)
    return torch.stack(rows)


def check_parent(graph: ModelGraph) -> BlockConfig:
    """Puzzle starts from a homogeneous parent (every layer the full GQA + MLP block); return that block."""
    parent = parent_block(graph.config)
    for i, b in enumerate(blocks(graph)):
        if b != parent:
            raise ValueError(f"layer {i} is {b.describe()}, not the parent block {parent.describe()}; Puzzle "
                             "searches from the original (uncompressed) model: run it before other stages")
    return parent


# ----------------------------------------------------------------------------- the library
@dataclass
class BlockLibrary:
    """Variants per part (identical for every layer) and the per-layer FFN channel ranking."""

    parent: BlockConfig
    attention: list[AttentionConfig]
    ffn: list[FFNConfig]
    channel_order: torch.Tensor  # [L, I] parent FFN channels by decreasing importance
    importance: torch.Tensor  # [L, I]
    config: dict

    @property
    def num_layers(self) -> int:
        return self.channel_order.shape[0]

    def variants(self, part: Part) -> list[AttentionConfig | FFNConfig]:
        return self.attention if part == "attention" else self.ffn

    def parent_part(self, part: Part) -> AttentionConfig | FFNConfig:
        return self.parent.attention if part == "attention" else self.parent.ffn

    def variant(self, part: Part, name: str) -> AttentionConfig | FFNConfig:
        for v in self.variants(part):
            if variant_name(v) == name:
                return v
        raise ValueError(f"{part} variant {name!r} is not in the library; it has "
                         f"{', '.join(variant_name(v) for v in self.variants(part))}")

    def channels(self, layer: int, variant: FFNConfig) -> torch.Tensor | None:
        """Channels an FFN variant keeps at `layer` (None for the parent, linear and no-op). -> [I']"""
        if variant.kind != "mlp" or variant == self.parent.ffn:
            return None
        return top_channels(self.channel_order[layer], variant.intermediate_size)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"order": self.channel_order.contiguous(), "importance": self.importance.contiguous()},
                  str(folder / "channels.safetensors"))
        meta = {"parent": self.parent.model_dump(), "attention": [a.model_dump() for a in self.attention],
                "ffn": [f.model_dump() for f in self.ffn], "config": self.config}
        tmp = folder / f".library.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / "library.json")

    @classmethod
    def load(cls, folder: str | Path) -> "BlockLibrary":
        folder = Path(folder)
        if not (folder / "library.json").exists():
            raise ValueError(f"no block library in {folder}; build it first (stage puzzle_library, "
                             "or rerun with --from puzzle_library)")
        meta = json.loads((folder / "library.json").read_text())
        t = load_file(str(folder / "channels.safetensors"))
        return cls(parent=BlockConfig(**meta["parent"]), attention=[AttentionConfig(**a) for a in meta["attention"]],
                   ffn=[FFNConfig(**f) for f in meta["ffn"]], channel_order=t["order"], importance=t["importance"],
                   config=meta["config"])

    def fingerprint(self) -> str:
        """Changes whenever the variants or the channel ranking change (keys BLD checkpoints)."""
        h = hashlib.sha256(json.dumps([self.parent.model_dump(), [a.model_dump() for a in self.attention],
                                       [f.model_dump() for f in self.ffn]]).encode())
        h.update(self.channel_order.numpy().tobytes())
        return h.hexdigest()[:16]


def build_library(graph: ModelGraph, tokens: torch.Tensor, cfg: LibraryConfig, device=None,
                  progress: Callable[[str, int, int], None] | None = None) -> BlockLibrary:
    """The library of `graph` (a homogeneous parent), with FFN channels ranked on calibration tokens [N, S]."""
    parent = check_parent(graph)
    att = attention_library(parent.attention, cfg.kv_heads, cfg.linear, cfg.noop)
    ffn = ffn_library(parent.ffn, cfg.ffn_fractions, cfg.linear, cfg.noop, cfg.multiple)
    importance = ffn_importance(graph, tokens, cfg.batch_size, device, progress)  # [L, I]
    order = importance.argsort(dim=1, descending=True)
    return BlockLibrary(parent=parent, attention=att, ffn=ffn, channel_order=order, importance=importance,
                        config=cfg.model_dump())
