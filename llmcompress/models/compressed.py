"""Checkpoints in the compressed-tensors format for graphs with compressed linears.

Saving writes every QuantLinear / Sparse24Linear under the tensor names of its compressed-tensors
format (kernels.ct_convert, lossless) and adds `quantization_config` to config.json the way
compressed-tensors writes it:
  {"quant_method": "compressed-tensors", "version": ..., "format": ..., "quantization_status": "compressed",
   "config_groups": {"group_0": {"targets": [...], "weights": {...}, "input_activations": ..., "format": ...}},
   "ignore": [...], "sparsity_config": {...}, "transform_config": {}, ...}
  int4 -> pack-quantized; int8 (W8A16) and w8a8 (dynamic per-token activations) -> int-quantized;
  2:4 alone -> sparsity_config format sparse-24-bitmask; 2:4 + int4 -> pack-quantized weights (plus
  a "bitmask" tensor) and a sparsity_config of format dense, structure 2:4.
A group's targets are ["Linear"] with everything else in `ignore` when one group covers all its
layers, else explicit module names.
Loading matches the schemes to the meta-built graph's nn.Linear modules with compressed-tensors' own
matcher, swaps in our modules and converts their tensors back, bit for bit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import is_match
from safetensors.torch import save_file
from torch import nn

from llmcompress.formats import QuantLinear, Sparse24Linear, weight_format
from llmcompress.kernels import ct_convert as ct

COMPRESSED = (QuantLinear, Sparse24Linear)


def is_compressed(graph: nn.Module) -> bool:
    return any(isinstance(m, COMPRESSED) for m in graph.modules())


# ----------------------------------------------------------------------------- tensors
def module_to_ct(mod: nn.Module) -> dict[str, torch.Tensor]:
    """One compressed linear -> its compressed-tensors tensors (local names)."""
    fmt = weight_format(mod)
    if fmt == "sparse24":
        sd = ct.sparse24_to_ct(mod.values, mod.meta)
    elif fmt == "int4":
        sd = ct.int4_to_ct(mod.qweight, mod.scales, mod.zeros)
    elif fmt == "sparse24_int4":
        sd = ct.sparse24_int4_to_ct(mod.qweight, mod.meta, mod.scales, mod.zeros, mod.group_size)
    else:
        sd = ct.int8_to_ct(mod.qweight, mod.scale)
    if mod.bias is not None:
        sd["bias"] = mod.bias
    return sd


def module_from_ct(fmt: str, group_size: int | None, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one linear -> our module's buffers (local names)."""
    if fmt == "sparse24":
        out = dict(zip(("values", "meta"), ct.sparse24_from_ct(sd)))
    elif fmt == "int4":
        out = dict(zip(("qweight", "scales", "zeros"), ct.int4_from_ct(sd)))
    elif fmt == "sparse24_int4":
        out = dict(zip(("qweight", "meta", "scales", "zeros"), ct.sparse24_int4_from_ct(sd, group_size)))
    else:
        out = dict(zip(("qweight", "scale"), ct.int8_from_ct(sd)))
    if "bias" in sd:
        out["bias"] = sd["bias"]
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- config
def _linears(graph: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in graph.named_modules() if isinstance(m, (nn.Linear, *COMPRESSED))}


def _targets(names: list[str], linears: dict[str, nn.Module], single: bool) -> tuple[list[str], list[str]]:
    """(targets, ignore) selecting exactly `names` among the model's linears."""
    if single:
        return ["Linear"], sorted(set(linears) - set(names))
    return sorted(names), []


def quantization_config(graph: nn.Module) -> dict:
    """The config.json `quantization_config` of a graph with compressed linears."""
    linears = _linears(graph)
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, m in linears.items():
        if isinstance(m, QuantLinear):
            groups[(m.fmt, m.group_size, m.symmetric)].append(name)
    out = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__, "transform_config": {}}
    if groups:
        config_groups, ignore = {}, []
        for i, ((fmt, g, sym), names) in enumerate(groups.items()):
            scheme = ct.ct_scheme(fmt, g, sym)
            scheme.targets, ignore = _targets(names, linears, len(groups) == 1)
            scheme.format = ct.CT_FORMAT[fmt]
            config_groups[f"group_{i}"] = scheme
        formats = {ct.CT_FORMAT[fmt] for fmt, _, _ in groups}
        qc = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                                format=formats.pop() if len(formats) == 1 else "mixed-precision")
        out |= qc.model_dump(mode="json", exclude={"quant_method"})
    sparse = [n for n, m in linears.items() if weight_format(m) in ("sparse24", "sparse24_int4")]
    plain = [n for n in sparse if isinstance(linears[n], Sparse24Linear)]
    out["sparsity_config"] = {}
    if sparse:
        names = plain or sparse  # 2:4 + int4 layers also carry their bitmask tensor
        targets, ignore = _targets(names, linears, True)
        zeros = sum(m.in_features * m.out_features // 2 for n, m in linears.items() if n in sparse)
        total = sum(m.in_features * m.out_features for m in linears.values())
        cfg = SparsityCompressionConfig.load_from_registry(
            "sparse-24-bitmask" if plain else "dense", targets=targets, ignore=ignore,
            global_sparsity=round(zeros / total, 6), sparsity_structure="2:4")
        out["sparsity_config"] = cfg.model_dump(mode="json", exclude={"registry_requires_subclass"})
    return out


# ----------------------------------------------------------------------------- save
def save_compressed(graph, folder: Path, homogeneous: bool, max_shard_size: str = "5GB") -> None:
    """Write config.json (+ modeling code when heterogeneous) and safetensors shards into folder."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.dynamic_module_utils import custom_object_save

    from llmcompress.models.loading import llama_config_of

    if homogeneous:
        config = llama_config_of(graph)
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]  # LlamaForCausalLM, ...
    else:
        config = graph.config
        config.architectures = ["DeciLMForCausalLM"]
        custom_object_save(graph, folder, config=config)
    config.save_pretrained(folder)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"] = quantization_config(graph)
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    compressed = {n: m for n, m in graph.named_modules() if isinstance(m, COMPRESSED)}
    state = {k: v for k, v in graph.state_dict().items() if k.rpartition(".")[0] not in compressed}
    for name, m in compressed.items():
        state |= {f"{name}.{k}": v for k, v in module_to_ct(m).items()}
    if graph.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- load
def _format_of(name: str, scheme, sparse24: bool, sparse_format: str, has_bitmask: bool) -> str | None:
    if scheme is None:
        return "sparse24" if sparse24 and sparse_format == "sparse-24-bitmask" else None
    w, acts = scheme.weights, scheme.input_activations
    supported = ("llmcompress loads int4 group-wise weights, int8 per-channel weights with optional dynamic "
                 "per-token int8 activations, and 2:4 sparsity")
    if w is None or w.type != "int" or w.num_bits not in (4, 8):
        raise ValueError(f"{name}: compressed-tensors scheme {scheme.weights} is not supported; {supported}")
    if w.num_bits == 4:
        if w.strategy != "group" or acts is not None:
            raise ValueError(f"{name}: int4 with strategy {w.strategy} / activations {acts} is not supported; {supported}")
        return "sparse24_int4" if sparse24 or has_bitmask else "int4"
    if w.strategy != "channel" or not w.symmetric:
        raise ValueError(f"{name}: int8 weights must be symmetric per channel, got {w.strategy}; {supported}")
    if acts is None:
        return "int8"
    if not (acts.type == "int" and acts.num_bits == 8 and acts.dynamic and acts.strategy == "token"):
        raise ValueError(f"{name}: int8 activations must be dynamic per token, got {acts}; {supported}")
    return "w8a8"


def prepare_compressed(graph: nn.Module, qconfig: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap the (meta-built) graph's linears for the modules its checkpoint holds; return the state
    with their tensors converted to our buffers."""
    groups = {k: v for k, v in qconfig.items() if k in QuantizationConfig.model_fields and k != "sparsity_config"}
    quant = QuantizationConfig.model_validate(groups) if qconfig.get("config_groups") else None
    sparsity = qconfig.get("sparsity_config") or {}
    is_24 = str(sparsity.get("sparsity_structure", "")).lower() == "2:4"
    by_module = defaultdict(list)
    for key in state:
        by_module[key.rpartition(".")[0]].append(key)
    for name, lin in list(graph.named_modules()):
        if not isinstance(lin, nn.Linear):
            continue
        scheme = None
        if quant is not None:
            scheme = next((s for s in quant.config_groups.values()
                           if is_match(name, lin, s.targets, quant.ignore or [])), None)
        sparse24 = is_24 and is_match(name, lin, sparsity.get("targets") or ["Linear"], sparsity.get("ignore") or [])
        fmt = _format_of(name, scheme, sparse24, sparsity.get("format", ""), f"{name}.bitmask" in state)
        if fmt is None:
            continue
        bias = lin.bias is not None
        if fmt == "sparse24":
            group_size, mod = None, Sparse24Linear(lin.in_features, lin.out_features, bias, device="meta")
        else:
            w = scheme.weights
            group_size = w.group_size if w.num_bits == 4 else None
            mod = QuantLinear(lin.in_features, lin.out_features, fmt, group_size or 128, w.symmetric, bias,
                              device="meta")
        graph.set_submodule(name, mod)
        sd = {k.rpartition(".")[2]: state.pop(k) for k in by_module[name]}
        state |= {f"{name}.{k}": v for k, v in module_from_ct(fmt, group_size, sd).items()}
    return state
