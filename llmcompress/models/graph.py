"""The model graph every stage reads and writes.

`ModelGraph` is the heterogeneous decoder of `modeling_llmcompress` (a transformers `PreTrainedModel`,
so lm-eval, `generate` and `save_pretrained` work on it). Each layer is described by a `BlockConfig`
(attention + FFN variant); this module turns those descriptions into modules and back, and changes
layers in place with sensible weight initialisation (Puzzle's: pruned channels, pooled KV heads,
linear replacements).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from llmcompress.models.modeling_llmcompress import (
    Attention,
    DecoderLayer,
    DeciLMForCausalLM,
    LinearAttention,
    LinearMLP,
    LlmcNasConfig,
    MLP,
    ffn_mult_of,
    uses_kv_cache,
)

ModelGraph = DeciLMForCausalLM


class AttentionConfig(BaseModel):
    """`gqa` with head counts (the parent's, or fewer KV heads / heads), `linear`, or `noop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gqa", "linear", "noop"] = "gqa"
    num_heads: int | None = None
    num_kv_heads: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "gqa":
            if not self.num_heads or not self.num_kv_heads:
                raise ValueError("a gqa attention block needs num_heads and num_kv_heads")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                    "each KV head must serve a whole group of query heads"
                )
        return self

    def describe(self) -> str:
        return f"gqa {self.num_heads}q/{self.num_kv_heads}kv" if self.kind == "gqa" else self.kind


class FFNConfig(BaseModel):
    """`mlp` with an intermediate size, `linear`, or `noop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mlp", "linear", "noop"] = "mlp"
    intermediate_size: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "mlp" and not (self.intermediate_size and self.intermediate_size > 0):
            raise ValueError("an mlp FFN block needs a positive intermediate_size")
        return self

    def describe(self) -> str:
        return f"mlp {self.intermediate_size}" if self.kind == "mlp" else self.kind


class BlockConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    attention: AttentionConfig
    ffn: FFNConfig

    def to_hf(self, hidden_size: int) -> dict:
        a, f = self.attention, self.ffn
        att = {"no_op": a.kind == "noop", "replace_with_linear": a.kind == "linear"}
        if a.kind == "gqa":
            att |= {"num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
                    "n_heads_in_group": a.num_heads // a.num_kv_heads}
        ffn = {"no_op": f.kind == "noop", "replace_with_linear": f.kind == "linear"}
        if f.kind == "mlp":
            ffn |= {"intermediate_size": f.intermediate_size,
                    "ffn_mult": ffn_mult_of(f.intermediate_size, hidden_size)}
        return {"attention": att, "ffn": ffn}

    @classmethod
    def from_hf(cls, block: dict, config: LlmcNasConfig) -> "BlockConfig":
        a, f = block["attention"], block["ffn"]
        if a.get("no_op"):
            att = AttentionConfig(kind="noop")
        elif a.get("replace_with_linear"):
            att = AttentionConfig(kind="linear")
        else:
            heads = a.get("num_attention_heads", config.num_attention_heads)
            kv = a.get("num_key_value_heads") or heads // a["n_heads_in_group"]
            att = AttentionConfig(kind="gqa", num_heads=heads, num_kv_heads=kv)
        if f.get("no_op"):
            ffn = FFNConfig(kind="noop")
        elif f.get("replace_with_linear"):
            ffn = FFNConfig(kind="linear")
        else:
            ffn = FFNConfig(kind="mlp", intermediate_size=f.get("intermediate_size", config.intermediate_size))
        return cls(attention=att, ffn=ffn)

    def describe(self) -> str:
        return f"{self.attention.describe()} | {self.ffn.describe()}"


def parent_block(config: LlmcNasConfig) -> BlockConfig:
    return BlockConfig(
        attention=AttentionConfig(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads),
        ffn=FFNConfig(intermediate_size=config.intermediate_size),
    )


def blocks(graph: ModelGraph) -> list[BlockConfig]:
    return [BlockConfig.from_hf(b, graph.config) for b in graph.config.block_configs]


def is_homogeneous_parent_layout(graph: ModelGraph) -> bool:
    """True when every layer is the same full GQA + MLP block (then it saves as plain Llama)."""
    bs = blocks(graph)
    return bool(bs) and all(b == bs[0] for b in bs) and bs[0].attention.kind == "gqa" and bs[0].ffn.kind == "mlp"


def _reindex_cache_slots(graph: ModelGraph) -> None:
    slot = 0
    for layer, block in zip(graph.model.layers, graph.config.block_configs):
        if isinstance(layer.self_attn, Attention):
            layer.self_attn.cache_idx = slot
        slot += uses_kv_cache(block)


# ----------------------------------------------------------------------------- weight initialisation
def _attention_init(old: nn.Module | None, new: nn.Module, cfg: LlmcNasConfig) -> None:
    """Initialise a new attention variant from the parent's weights (Puzzle's recipes)."""
    if not isinstance(old, Attention):
        return
    hd = cfg.head_dim
    if isinstance(new, Attention):
        # keep the first `new.num_kv_heads` query groups' worth of heads; merge KV heads by mean pooling
        rep_old = old.num_heads // old.num_kv_heads
        rep_new = new.num_heads // new.num_kv_heads
        if new.num_heads == old.num_heads:
            # fewer KV heads, same queries: pool K/V within the merged groups
            merge = old.num_kv_heads // new.num_kv_heads
            for name in ("k_proj", "v_proj"):
                w = getattr(old, name).weight.view(new.num_kv_heads, merge, hd, -1).mean(1)
                getattr(new, name).weight.data.copy_(w.reshape(-1, w.shape[-1]))
                if getattr(old, name).bias is not None:
                    b = getattr(old, name).bias.view(new.num_kv_heads, merge, hd).mean(1).reshape(-1)
                    getattr(new, name).bias.data.copy_(b)
            new.q_proj.load_state_dict(old.q_proj.state_dict())
            new.o_proj.load_state_dict(old.o_proj.state_dict())
        elif rep_new == rep_old and new.num_kv_heads <= old.num_kv_heads:
            # whole query groups removed: keep the first groups
            nq, nkv = new.num_heads * hd, new.num_kv_heads * hd
            new.q_proj.weight.data.copy_(old.q_proj.weight[:nq])
            new.k_proj.weight.data.copy_(old.k_proj.weight[:nkv])
            new.v_proj.weight.data.copy_(old.v_proj.weight[:nkv])
            new.o_proj.weight.data.copy_(old.o_proj.weight[:, :nq])
            for name, n in (("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)):
                if getattr(old, name).bias is not None:
                    getattr(new, name).bias.data.copy_(getattr(old, name).bias[:n])
    elif isinstance(new, LinearAttention):
        # a token attending only to itself outputs W_O · expand(W_V x)
        rep = old.num_heads // old.num_kv_heads
        wv = old.v_proj.weight.view(old.num_kv_heads, hd, -1).repeat_interleave(rep, 0).reshape(-1, cfg.hidden_size)
        new.linear_attn.weight.data.copy_(old.o_proj.weight @ wv)


def _ffn_init(old: nn.Module | None, new: nn.Module, channels: torch.Tensor | None) -> None:
    if not isinstance(old, MLP):
        return
    if isinstance(new, MLP):
        n = new.down_proj.in_features
        idx = channels if channels is not None else torch.arange(n)
        if len(idx) != n:
            raise ValueError(f"{len(idx)} channels given for an FFN of {n} channels")
        new.gate_proj.weight.data.copy_(old.gate_proj.weight[idx])
        new.up_proj.weight.data.copy_(old.up_proj.weight[idx])
        new.down_proj.weight.data.copy_(old.down_proj.weight[:, idx])
        for name in ("gate_proj", "up_proj"):
            if getattr(old, name).bias is not None:
                getattr(new, name).bias.data.copy_(getattr(old, name).bias[idx])
        if old.down_proj.bias is not None:
            new.down_proj.bias.data.copy_(old.down_proj.bias)
    elif isinstance(new, LinearMLP):
        new.linear_mlp.weight.data.copy_(old.down_proj.weight @ old.up_proj.weight)


def set_block(graph: ModelGraph, index: int, block: BlockConfig, channels: torch.Tensor | None = None) -> None:
    """Replace layer `index` by `block`, initialising from the current layer's weights where possible.

    `channels` optionally names which FFN channels of the current layer to keep (default: the first ones).
    """
    n = len(graph.model.layers)
    if not 0 <= index < n:
        raise ValueError(f"layer {index} does not exist; the model has layers 0..{n - 1}")
    cfg = graph.config
    old = graph.model.layers[index]
    ref = next(graph.parameters())
    cfg.block_configs[index] = block.to_hf(cfg.hidden_size)
    new = DecoderLayer(cfg, cfg.block_configs[index], 0).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if getattr(old, norm) is not None and getattr(new, norm) is not None:
                getattr(new, norm).weight.copy_(getattr(old, norm).weight)
        if block.attention == BlockConfig.from_hf(_block_of(old, cfg), cfg).attention:
            new.self_attn = old.self_attn
        else:
            _attention_init(old.self_attn, new.self_attn, cfg)
        if block.ffn.kind == "mlp" and isinstance(old.mlp, MLP) and channels is None \
                and old.mlp.down_proj.in_features == block.ffn.intermediate_size:
            new.mlp = old.mlp
        else:
            _ffn_init(old.mlp, new.mlp, channels)
    graph.model.layers[index] = new
    _reindex_cache_slots(graph)


def _block_of(layer: DecoderLayer, cfg: LlmcNasConfig) -> dict:
    """The block dict describing an existing layer module (used to compare variants)."""
    a, f = layer.self_attn, layer.mlp
    if a is None:
        att = AttentionConfig(kind="noop")
    elif isinstance(a, LinearAttention):
        att = AttentionConfig(kind="linear")
    else:
        att = AttentionConfig(kind="gqa", num_heads=a.num_heads, num_kv_heads=a.num_kv_heads)
    if f is None:
        ffn = FFNConfig(kind="noop")
    elif isinstance(f, LinearMLP):
        ffn = FFNConfig(kind="linear")
    else:
        ffn = FFNConfig(kind="mlp", intermediate_size=f.down_proj.in_features)
    return BlockConfig(attention=att, ffn=ffn).to_hf(cfg.hidden_size)


def remove_layers(graph: ModelGraph, indices: list[int]) -> None:
    """Drop whole layers (the result stays a plain decoder with fewer layers)."""
    drop = set(indices)
    bad = [i for i in drop if not 0 <= i < len(graph.model.layers)]
    if bad:
        raise ValueError(f"layers {sorted(bad)} do not exist; the model has {len(graph.model.layers)} layers")
    keep = [i for i in range(len(graph.model.layers)) if i not in drop]
    graph.model.layers = nn.ModuleList(graph.model.layers[i] for i in keep)
    graph.config.block_configs = [graph.config.block_configs[i] for i in keep]
    graph.config.num_hidden_layers = len(keep)
    _reindex_cache_slots(graph)


def build(config: LlmcNasConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ModelGraph:
    """A randomly initialised graph (tests, and the skeleton that checkpoints are loaded into)."""
    with torch.device(device):
        model = DeciLMForCausalLM(config)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- reporting
def count_params(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def linear_formats(graph: ModelGraph) -> dict[str, str]:
    """Weight format of every linear layer of the decoder (name -> format)."""
    out = {}
    for name, mod in graph.model.layers.named_modules():
        fmt = getattr(mod, "weight_format", None)
        if isinstance(fmt, str):
            out[f"layers.{name}"] = fmt
        elif isinstance(mod, nn.Linear):
            out[f"layers.{name}"] = "dense"
    return out


def layer_table(graph: ModelGraph) -> list[dict]:
    """One row per layer: index, block description, parameters, weight formats used."""
    formats = linear_formats(graph)
    rows = []
    for i, (layer, block) in enumerate(zip(graph.model.layers, blocks(graph))):
        fmts = sorted({f for n, f in formats.items() if n.startswith(f"layers.{i}.")})
        rows.append({
            "layer": i,
            "attention": block.attention.describe(),
            "ffn": block.ffn.describe(),
            "params": count_params(layer),
            "formats": ",".join(fmts) or "-",
        })
    return rows
