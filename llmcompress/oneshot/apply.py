"""One-shot pruning and quantization of a whole graph: typed configs (the recipe/CLI sections) and
the drivers that run the pure solvers under the layer-by-layer calibration.

Decoder linears are compressed; embeddings and lm_head stay dense. Output formats:
  prune 2:4                -> Sparse24Linear ("sparse24"); other patterns keep nn.Linear with zeros
  quantize w4a16           -> QuantLinear "int4", or "sparse24_int4" when the input layer is 2:4
  quantize w8a16 / w8a8    -> QuantLinear "int8" / "w8a8" (dynamic per-token int8 activations)
Quantization keeps every weight that is exactly zero at zero (a pruned model keeps its mask).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.kernels.sparse24_pack import decompress_24_ref
from llmcompress.oneshot.calibrate import LINEAR_TYPES, InputStats, Progress, calibrate_layerwise
from llmcompress.oneshot.gptq import gptq_quantize
from llmcompress.oneshot.magnitude import check_pattern, magnitude_prune, parse_pattern
from llmcompress.oneshot.rtn import GROUP_SIZES, QuantSpec, check_group_size, rtn_quantize
from llmcompress.oneshot.smoothquant import smooth_layer, smoothing_map
from llmcompress.oneshot.sparsegpt import sparsegpt_prune
from llmcompress.oneshot.wanda import wanda_prune


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(128, gt=0, description="calibration sequences")
    seq_len: int = Field(512, gt=1, description="tokens per calibration sequence")
    batch_size: int = Field(2, gt=0, description="sequences per forward of a layer (small batches keep the "
                                                  "attention temporaries, and so the peak memory, small)")
    true_sequential: bool = Field(True, description="compress q/k/v, o, gate/up, down in turn, each seeing "
                                                    "the earlier ones compressed (else one pass per half-layer)")
    blocksize: int = Field(128, gt=0, description="columns per OBS block")
    percdamp: float = Field(0.01, gt=0, description="Hessian damping, fraction of its mean diagonal")
    device: str | None = Field(None, description="device the current layer runs on (default: the model's)")


class PruneConfig(CalibrationConfig):
    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    pattern: str = Field("2:4", description="n:m (keep n of every m: 2:4, 4:8) or a pruned ratio (0.5)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v


class QuantizeConfig(CalibrationConfig):
    scheme: Literal["w4a16", "w8a16", "w8a8"] = "w4a16"
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(128, description="int4 columns per scale: 32, 64 or 128 (w4a16 only)")
    symmetric: bool = Field(True, description="int4 zero code fixed at 8 (else a zero point per group)")
    act_order: bool = Field(False, description="GPTQ: columns by decreasing Hessian diagonal (static groups)")
    smoothquant_alpha: float | None = Field(None, ge=0, le=1, description="w8a8: SmoothQuant migration strength")

    @model_validator(mode="after")
    def _check(self):
        if self.scheme == "w4a16" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.smoothquant_alpha is not None and self.scheme != "w8a8":
            raise ValueError("smoothquant_alpha applies to scheme w8a8 only (it smooths int8 activations)")
        return self

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(4, self.group_size, self.symmetric) if self.scheme == "w4a16" else QuantSpec(8, None, True)


# ----------------------------------------------------------------------------- helpers
def decoder_linears(graph) -> dict[str, nn.Module]:
    """Full name -> module of every linear inside the decoder layers."""
    return {f"model.layers.{n}": m for n, m in graph.model.layers.named_modules() if isinstance(m, LINEAR_TYPES)}


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], keep bool [N, K]) of a dense or 2:4 linear; keep marks the weights that may be nonzero."""
    if isinstance(module, Sparse24Linear):
        w = module.dequantize()
        return w, decompress_24_ref(torch.ones_like(module.values), module.meta) != 0
    return module.weight.detach(), module.weight.detach() != 0


def _sparsity(graph) -> float:
    zeros = total = 0
    for m in decoder_linears(graph).values():
        w = m.dequantize() if hasattr(m, "dequantize") else m.weight
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(total, 1)


def _replace(graph, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    graph.get_submodule(parent).set_submodule(child, module)


def _calibration_note(tokens: torch.Tensor | None) -> str:
    return "none (weights only)" if tokens is None else f"{tokens.shape[0]} sequences of {tokens.shape[1]} tokens"


# ----------------------------------------------------------------------------- prune
def check_prunable(graph, cfg: PruneConfig) -> None:
    """Refuse up front (before any calibration) what would fail halfway."""
    pattern = parse_pattern(cfg.pattern)
    for name, m in decoder_linears(graph).items():
        if type(m) is not nn.Linear:
            raise ValueError(f"{name} is already compressed ({m.weight_format}); prune the dense model")
        check_pattern(name, m.in_features, pattern)


def prune_model(graph, tokens: torch.Tensor | None, cfg: PruneConfig, progress: Progress | None = None) -> dict:
    """Prune every decoder linear of graph in place. tokens: [N, S] (not needed for magnitude)."""
    check_prunable(graph, cfg)
    pattern, linears = parse_pattern(cfg.pattern), decoder_linears(graph)

    def compress(name: str, module: nn.Module, stats: InputStats | None) -> nn.Module:
        W = module.weight.detach()
        if cfg.method == "sparsegpt":
            W, _ = sparsegpt_prune(W, stats.H, pattern, cfg.blocksize, cfg.percdamp)
        elif cfg.method == "wanda":
            W, _ = wanda_prune(W, stats.sqnorm, pattern)
        else:
            W, _ = magnitude_prune(W, pattern)
        module.weight.data.copy_(W)
        return Sparse24Linear.from_dense(module) if pattern.is_24 else module

    if cfg.method == "magnitude":
        for name, m in linears.items():
            _replace(graph, name, compress(name, m, None))
        tokens = None
    else:
        if tokens is None:
            raise ValueError(f"{cfg.method} needs calibration data")
        calibrate_layerwise(graph, tokens, compress, hessian=cfg.method == "sparsegpt", norms=cfg.method == "wanda",
                            device=cfg.device,
                            true_sequential=cfg.true_sequential, batch_size=cfg.batch_size, progress=progress,
                            label=f"pruning ({cfg.method} {cfg.pattern})")
    return {"method": cfg.method, "pattern": cfg.pattern, "linears": len(linears),
            "format": "sparse24" if pattern.is_24 else "dense (zeros in place)",
            "sparsity": round(_sparsity(graph), 6), "calibration": _calibration_note(tokens)}


# ----------------------------------------------------------------------------- quantize
def check_quantizable(graph, cfg: QuantizeConfig) -> None:
    """Refuse up front (before any calibration) what would fail halfway: quantized or 2:4 layers the
    scheme cannot take, and group sizes that do not divide a layer's input width."""
    for name, m in decoder_linears(graph).items():
        if isinstance(m, QuantLinear):
            raise ValueError(f"{name} is already quantized ({m.fmt}); quantize the dense or 2:4 model")
        if isinstance(m, Sparse24Linear) and cfg.scheme != "w4a16":
            raise ValueError(f"{name} is 2:4 sparse and 2:4 + int8 has no kernel; use scheme w4a16 (2:4 + int4)")
        check_group_size(name, m.in_features, cfg.spec)


def quantize_model(graph, tokens: torch.Tensor | None, cfg: QuantizeConfig, progress: Progress | None = None) -> dict:
    """Quantize every decoder linear of graph in place. tokens: [N, S] (not needed for rtn)."""
    check_quantizable(graph, cfg)
    spec, formats, smoothed = cfg.spec, {}, []

    def compress(name: str, module: nn.Module, stats: InputStats | None) -> nn.Module:
        W, keep = _dense(module)
        sparse = isinstance(module, Sparse24Linear)
        if cfg.method == "gptq":
            q = gptq_quantize(W, stats.H, spec, keep, cfg.blocksize, cfg.percdamp, cfg.act_order)
        else:
            q = rtn_quantize(W, spec, keep)
        fmt = {"w4a16": "sparse24_int4" if sparse else "int4", "w8a16": "int8", "w8a8": "w8a8"}[cfg.scheme]
        formats[fmt] = formats.get(fmt, 0) + 1
        return QuantLinear.from_codes(fmt, q.codes, q.scales, q.zeros, keep if sparse else None, module.bias)

    def prepare(layer: nn.Module, collect) -> None:
        stats = collect([names[0] for _, _, names in smoothing_map(layer)])
        smoothed.extend(smooth_layer(layer, {n: s.absmax for n, s in stats.items()}, cfg.smoothquant_alpha))

    if cfg.method == "rtn" and cfg.smoothquant_alpha is None:
        for name, m in decoder_linears(graph).items():
            _replace(graph, name, compress(name, m, None))
        tokens = None
    else:
        if tokens is None:
            raise ValueError("gptq and SmoothQuant need calibration data")
        calibrate_layerwise(graph, tokens, compress, hessian=cfg.method == "gptq", norms=False, device=cfg.device,
                            prepare=prepare if cfg.smoothquant_alpha is not None else None,
                            true_sequential=cfg.true_sequential, batch_size=cfg.batch_size, progress=progress,
                            label=f"quantizing ({cfg.method} {cfg.scheme})")
    report = {"scheme": cfg.scheme, "method": cfg.method, "formats": formats, "calibration": _calibration_note(tokens)}
    if cfg.scheme == "w4a16":
        report |= {"group_size": cfg.group_size, "symmetric": cfg.symmetric}
    if cfg.smoothquant_alpha is not None:
        report |= {"smoothquant_alpha": cfg.smoothquant_alpha, "smoothed_linears": len(smoothed)}
    return report
