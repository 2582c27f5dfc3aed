"""Layer-by-layer calibration: one decoder layer at a time, its inputs propagated through the
already-compressed layers before it (SparseGPT/GPTQ's sequential driver, without exceptions or
per-model code).

1. The inputs of decoder layer 0 (embedding output, rotary cos/sin) are captured for all calibration
   sequences by swapping the layer list for a catcher for one forward of the embedding.
2. For each layer, each half (attention, then MLP) and each group of its linears in order
   (q/k/v -> o, gate/up -> down: "true sequential"), hooks accumulate the linears' input statistics
   over the half's forward, then `compress(name, module, stats)` returns each linear's replacement,
   so later groups see the earlier ones compressed.
3. The half's (compressed) output becomes the next half's input; the layer's output the next layer's.
Only the current layer is moved to `device`; the rest of the model stays where it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from llmcompress.formats import QuantLinear, Sparse24Linear

LINEAR_TYPES = (nn.Linear, Sparse24Linear, QuantLinear)
# the order linears are compressed in within a block; any other linear comes last
ORDER = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]

Compress = Callable[[str, nn.Module, "InputStats"], nn.Module]
Progress = Callable[[str, int, int], None]


class InputStats:
    """Running statistics of a linear layer's inputs x: [T, K] (T tokens seen so far)."""

    def __init__(self, k: int, device, hessian: bool = True):
        self.n = 0
        self.H = torch.zeros(k, k, device=device) if hessian else None  # 2/n Σ x xᵀ (OBS solvers)
        self.sqnorm = torch.zeros(k, device=device)  # Σ x_j² (Wanda)
        self.absmax = torch.zeros(k, device=device)  # max |x_j| (SmoothQuant)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        t = x.shape[0]
        if self.H is not None:
            self.H.mul_(self.n / (self.n + t)).addmm_(x.T, x, alpha=2 / (self.n + t))
        self.n += t
        self.sqnorm += x.pow(2).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], hessian: bool = True) -> Iterator[dict[str, InputStats]]:
    """The one place calibration hooks are registered: every forward of modules[name] adds its
    input to stats[name]; the hooks are removed on exit."""
    stats, handles = {}, []
    for name, mod in modules.items():
        ref = next(iter(mod.buffers()), None) if not isinstance(mod, nn.Linear) else mod.weight
        stats[name] = s = InputStats(mod.in_features, ref.device, hessian)
        handles.append(mod.register_forward_hook(lambda m, args, out, s=s: s.add(args[0])))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


class _Catcher(nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, cos, sin, mask, cache):
        self.inputs.append((x, cos, sin))
        return x


@torch.no_grad()
def first_layer_inputs(graph, tokens: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """tokens: [N, S] -> per batch (x [B, S, D], cos [B, S, hd], sin [B, S, hd]) on device."""
    model, catcher = graph.model, _Catcher()
    layers, model.layers = model.layers, nn.ModuleList([catcher])
    try:
        home = model.embed_tokens.weight.device
        for batch in tokens.split(batch_size):
            model(batch.to(home))
    finally:
        model.layers = layers
    return [tuple(t.to(device) for t in inp) for inp in catcher.inputs]


def linear_groups(block: nn.Module, true_sequential: bool = True) -> list[list[str]]:
    """Names of block's linear children, grouped in compression order."""
    names = [n for n, m in block.named_children() if isinstance(m, LINEAR_TYPES)]
    groups = [[n for n in g if n in names] for g in ORDER]
    groups.append([n for n in names if not any(n in g for g in ORDER)])
    groups = [g for g in groups if g]
    return groups if true_sequential else [sum(groups, [])]


def halves(layer: nn.Module) -> list[tuple[str, nn.Module, Callable]]:
    """(prefix, block, residual step x -> x') for the attention and MLP halves of a DecoderLayer
    (mirrors DecoderLayer.forward; no-op halves are absent)."""
    out = []
    if layer.self_attn is not None:
        out.append(("self_attn", layer.self_attn,
                    lambda x, cos, sin: x + layer.self_attn(layer.input_layernorm(x), cos, sin, None, None)))
    if layer.mlp is not None:
        out.append(("mlp", layer.mlp, lambda x, cos, sin: x + layer.mlp(layer.post_attention_layernorm(x))))
    return out


@torch.no_grad()
def calibrate_layerwise(
    graph,
    tokens: torch.Tensor,
    compress: Compress,
    *,
    hessian: bool = True,
    prepare: Callable[[nn.Module, Callable], None] | None = None,
    true_sequential: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    label: str = "calibrating layers",
) -> None:
    """Compress every decoder linear of `graph` in place, layer by layer.

    tokens: [N, S] calibration sequences. compress(full_name, module, stats) -> replacement module.
    prepare(layer, collect), if given, runs first on each layer; collect(names) -> {name: InputStats}
    runs the layer once with hooks on those linears (SmoothQuant uses it to fold scales).
    """
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = first_layer_inputs(graph, tokens, batch_size, device)
    n_layers = len(graph.model.layers)
    for idx, layer in enumerate(graph.model.layers):
        layer.to(device)
        if prepare is not None:
            def collect(names: list[str], layer=layer) -> dict[str, InputStats]:
                with capture_inputs({n: layer.get_submodule(n) for n in names}, hessian=False) as stats:
                    for x, cos, sin in inputs:
                        layer(x, cos, sin, None, None)
                return stats

            prepare(layer, collect)
        for prefix, block, step in halves(layer):
            for group in linear_groups(block, true_sequential):
                with capture_inputs({n: block.get_submodule(n) for n in group}, hessian) as stats:
                    for x, cos, sin in inputs:
                        step(x, cos, sin)
                for n in group:
                    name = f"model.layers.{idx}.{prefix}.{n}"
                    block.set_submodule(n, compress(name, block.get_submodule(n), stats[n]))
                del stats
            inputs = [(step(x, cos, sin), cos, sin) for x, cos, sin in inputs]
        layer.to(home)
        if progress is not None:
            progress(label, idx + 1, n_layers)
