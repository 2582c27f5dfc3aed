"""Heterogeneous Llama-family decoder (Nemotron-NAS / DeciLM `block_configs` layout).

This file is self-contained (torch + transformers only): llmcompress uses it as its in-memory model
graph and copies it beside every heterogeneous checkpoint, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs exactly the same code.

Per layer, `block_configs[i]` says what the block is:
  attention: {"no_op": bool, "replace_with_linear": bool,
              "num_attention_heads": int, "num_key_value_heads": int, "n_heads_in_group": int}
  ffn:       {"no_op": bool, "replace_with_linear": bool, "intermediate_size": int, "ffn_mult": float}
Parameter names follow Llama (`model.layers.{i}.self_attn.q_proj.weight`, ...); a linear replacement is
`self_attn.linear_attn` / `mlp.linear_mlp` as in DeciLM.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


def ffn_mult_of(intermediate_size: int, hidden_size: int) -> float:
    # DeciLM: intermediate = round_up(int(2 * ffn_mult * hidden / 3), 256); we store both.
    return round(3 * intermediate_size / (2 * hidden_size), 6)


def parent_block(num_attention_heads: int, num_key_value_heads: int, intermediate_size: int, hidden_size: int) -> dict:
    return {
        "attention": {
            "no_op": False,
            "replace_with_linear": False,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "n_heads_in_group": num_attention_heads // num_key_value_heads,
        },
        "ffn": {
            "no_op": False,
            "replace_with_linear": False,
            "intermediate_size": intermediate_size,
            "ffn_mult": ffn_mult_of(intermediate_size, hidden_size),
        },
    }


class LlmcNasConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 4096,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        hidden_act: str = "silu",
        block_configs: list[dict] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # transformers 5 warns on any assignment of rope_scaling
            self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.hidden_act = hidden_act
        if block_configs is None:
            block_configs = [
                parent_block(num_attention_heads, self.num_key_value_heads, intermediate_size, hidden_size)
                for _ in range(num_hidden_layers)
            ]
        self.block_configs = block_configs
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rope_inv_freq(config: LlmcNasConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; this file may run beside a checkpoint elsewhere
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """GQA attention with its own head counts. `cache_idx` is this layer's slot in the KV cache."""

    def __init__(self, config: LlmcNasConfig, num_heads: int, num_kv_heads: int, cache_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, config.head_dim
        self.cache_idx = cache_idx
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: Cache | None):
        # x: [B, S, D]; cos, sin: [B, S, hd]; mask: None (causal) or bool [B, 1, S, S_total]
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.cache_idx)  # [B, Hkv, S_total, hd]
        rep = self.num_heads // self.num_kv_heads
        gqa = {}
        if rep > 1 and _SDPA_GQA and x.device.type == "cpu":  # the kernel reads each KV head for its group
            gqa = {"enable_gqa": True}
        elif rep > 1:  # copies of the KV heads (a decode step on CPU: ~55 us per layer more)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class LinearAttention(nn.Module):
    """Attention replaced by one linear layer (each token attends only to itself: W_V W_O)."""

    def __init__(self, config: LlmcNasConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        return self.linear_attn(x)


class MLP(nn.Module):
    def __init__(self, config: LlmcNasConfig, intermediate_size: int):
        super().__init__()
        d, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    def __init__(self, config: LlmcNasConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlmcNasConfig, block: dict, cache_idx: int):
        super().__init__()
        att, ffn = block["attention"], block["ffn"]
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        if not att.get("no_op", False):
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if att.get("replace_with_linear", False):
                self.self_attn = LinearAttention(config)
            else:
                heads = att.get("num_attention_heads", config.num_attention_heads)
                kv = att.get("num_key_value_heads") or heads // att["n_heads_in_group"]
                self.self_attn = Attention(config, heads, kv, cache_idx)
        if not ffn.get("no_op", False):
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            if ffn.get("replace_with_linear", False):
                self.mlp = LinearMLP(config)
            else:
                self.mlp = MLP(config, ffn.get("intermediate_size", config.intermediate_size))

    def forward(self, x, cos, sin, mask, cache):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def uses_kv_cache(block: dict) -> bool:
    att = block["attention"]
    return not att.get("no_op", False) and not att.get("replace_with_linear", False)


class LlmcNasPreTrainedModel(PreTrainedModel):
    config_class = LlmcNasConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class LlmcNasModel(LlmcNasPreTrainedModel):
    def __init__(self, config: LlmcNasConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        slots, layers = 0, []
        for block in config.block_configs:
            layers.append(DecoderLayer(config, block, slots))
            slots += uses_kv_cache(block)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._inv_freq = None  # computed on first use: a plain attribute survives meta-device loading
        self.post_init()

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != torch.device(device):
            self._inv_freq = rope_inv_freq(self.config).to(device)
        return self._inv_freq

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=False, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, D]
        B, S, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device).unsqueeze(0).expand(B, S)
        freqs = position_ids[..., None].float() * self.inv_freq(x.device)  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # bool [B or 1, 1, S, past + S], as given
            if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (S, past + S):
                raise ValueError(f"a 4-D attention mask must be bool [B, 1, {S}, {past + S}], got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
            mask = attention_mask
        elif attention_mask is not None and not bool(attention_mask.all()):
            # keys: [B, past+S] padding mask; queries may attend to key j if j <= past + i and not padded
            total = attention_mask.shape[-1]
            q_pos = torch.arange(past, past + S, device=x.device)[:, None]
            k_pos = torch.arange(total, device=x.device)[None, :]
            mask = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, S, total]
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN
        elif past > 0 and S > 1:
            q_pos = torch.arange(past, past + S, device=x.device)[:, None]
            mask = (torch.arange(past + S, device=x.device)[None, :] <= q_pos)[None, None]
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        return x, cache, hidden


def _output(**fields):
    # transformers 5 renamed `past_key_values` to `cache`; fill whichever this version has.
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    cache = fields.pop("cache")
    fields["cache" if "cache" in names else "past_key_values"] = cache
    return CausalLMOutputWithPast(**fields)


def head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a vocabulary-sized weight: [..., D] @ [V, D]^T -> [..., V].

    On CPU, a product of 2..8 rows with a large [V, D] weight (speculative verification scores gamma + 1
    tokens) costs MKL's sgemm 2.3-4x the one-row GEMV (49152 x 576, measured: 13 ms for 1 row, 30-53 ms for
    2-4), while W @ x^T reads the weight once (13-16 ms). One row and longer inputs keep F.linear."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 2 <= rows <= 8 or weight.shape[0] < 4096:
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, -1).T).T  # [rows, V]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class DeciLMForCausalLM(LlmcNasPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlmcNasConfig):
        super().__init__(config)
        self.model = LlmcNasModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep: int = 0, cache=None, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x, cache, hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                      bool(use_cache), bool(output_hidden_states))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        head = self.lm_head
        if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
            logits = head_linear(x, head.weight, head.bias)  # [B, S, V]
        else:  # a replaced head (a draft's SubsetHead), or one whose hooks must see the call
            logits = head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return _output(loss=loss, logits=logits, cache=cache,
                       hidden_states=tuple(hidden) if hidden is not None else None)


LlmcNasConfig.register_for_auto_class()
DeciLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
