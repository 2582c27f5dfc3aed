"""CPU decoding with oneDNN linears whose weights are reordered once.

On this project's CPUs (AVX2, no AVX-512) torch's `F.linear` goes to MKL's sgemm, whose cost for 2..8 rows is
1.5-2.5x its one-row GEMV at our layer shapes: speculative verification of gamma + 1 tokens then costs far more
than a decode step (benchmarks/spec_verify_cost.py). oneDNN's inner product over a weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the op torch.compile's CPU backend uses for the same
purpose) costs about the same for 1 to 8 rows, and less than MKL's GEMV for one row at most shapes. These ops are
torch internals, not public API: `onednn_available()` checks that they exist and run, and every caller falls back
to `F.linear` when they don't.

`packed_linears(*models)` is a context manager: within it, every float32 CPU `nn.Linear` of the models is a
`PackedLinear` sharing the same weight Parameter, and every `SubsetHead` projects through one; on exit the original
modules are back. For inference: a packed weight is a copy taken on entry, so the block must not change weights; a
call that needs gradients (grad enabled, a trainable weight or input) goes through F.linear instead.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

CpuLinear = Literal["auto", "onednn", "torch"]


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear ops and they run here (checked once per process)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.ones(8, 16), torch.ones(2, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return bool(torch.equal(y, F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] float32 CPU weight reordered into oneDNN's blocked layout (an opaque copy: only `packed_linear`
    reads it). No batch-size hint: one layout serves every number of rows."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"oneDNN packing takes a 2-D float32 CPU weight, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}; use F.linear for it")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) with W given as `pack_weight(W)`. x: [..., K] -> [..., N]"""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [R, K]
    b = None if bias is None else bias.detach()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, b, "none", [], "")  # [R, N]
    return y.reshape(*x.shape[:-1], out_features)


def needs_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product with `weight` must carry gradients (then it goes through F.linear, not the packed copy)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class PackedLinear(nn.Module):
    """An `nn.Linear` for inference on CPU: the same weight and bias Parameters (state dict unchanged), computed
    through a oneDNN-reordered copy of the weight taken at construction."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None, packed: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_weight(weight) if packed is None else packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"PackedLinear runs float32 CPU inputs, got {x.dtype} on {x.device}; leave "
                             "packed_linears() before moving or casting the model")
        if needs_grad(x, self.weight):  # the packed copy carries no gradient: the plain product does
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN"


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2


def resolve(choice: CpuLinear, device: torch.device | str) -> bool:
    """Whether to pack for `choice` on `device`: auto packs on CPU when oneDNN runs; onednn demands it."""
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"cpu_linear {choice!r}: choose auto, onednn or torch")
    on_cpu = torch.device(device).type == "cpu"
    if choice == "onednn" and not (on_cpu and onednn_available()):
        raise ValueError("cpu_linear 'onednn' needs a CPU model and a torch build whose oneDNN linear ops run here "
                         "(torch.backends.mkldnn); use 'auto' or 'torch'")
    return choice != "torch" and on_cpu and onednn_available()


@contextlib.contextmanager
def packed_linears(*models: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every float32 CPU `nn.Linear` of `models` is a `PackedLinear` and every `SubsetHead`
    projects through a packed copy of its weight. Yields how many weights were packed (0 when not `enabled` or
    oneDNN is unavailable). The original modules are restored on exit, also after an error."""
    from llmcompress.speculative.vocab import SubsetHead

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    heads: list[SubsetHead] = []
    packs: dict[int, torch.Tensor] = {}  # a weight shared by modules or models (a draft using the target's head): once

    try:
        if enabled and onednn_available():
            for model in models:
                for parent in list(model.modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is nn.Linear and _packable(child):
                            key = id(child.weight)
                            if key not in packs:
                                packs[key] = pack_weight(child.weight)
                            setattr(parent, name, PackedLinear(child.weight, child.bias, packs[key]))
                            swapped.append((parent, name, child))
                        elif isinstance(child, SubsetHead) and _packable(child) and child not in heads:
                            child.packed = pack_weight(child.weight)
                            heads.append(child)
        yield len(packs) + len(heads)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
        for head in heads:
            head.packed = None


__all__ = ["CpuLinear", "PackedLinear", "needs_grad", "onednn_available", "pack_weight", "packed_linear",
           "packed_linears", "resolve"]
