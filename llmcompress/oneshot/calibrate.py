"""Layer-by-layer calibration: one decoder layer at a time, its inputs propagated through the
already-compressed layers before it (SparseGPT/GPTQ's sequential driver, without per-model code).

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

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager, suppress
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
    """Running statistics of a linear layer's inputs x: [T, K] (T tokens seen so far): the Hessian
    2/n Σ x xᵀ when `hessian`, Σ x_j² and max |x_j| when `norms`."""

    def __init__(self, k: int, device, hessian: bool = True, norms: bool = True):
        self.n = 0
        self.H = torch.zeros(k, k, device=device) if hessian else None  # 2/n Σ x xᵀ (OBS solvers)
        self.sqnorm = torch.zeros(k, device=device) if norms else None  # Σ x_j² (Wanda)
        self.absmax = torch.zeros(k, device=device) if norms else None  # max |x_j| (SmoothQuant)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        t = x.shape[0]
        if self.H is not None:
            self.H.mul_(self.n / (self.n + t)).addmm_(x.T, x, alpha=2 / (self.n + t))
        self.n += t
        if self.sqnorm is not None:
            self.sqnorm += x.pow(2).sum(0)
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], hessian: bool = True,
                   norms: bool = True) -> Iterator[dict[str, InputStats]]:
    """The one place calibration hooks are registered: every forward of modules[name] adds its
    input to stats[name]; the hooks are removed on exit.

    Modules fed the very same tensor one after the other (q/k/v, gate/up) share one InputStats: the
    statistics are computed once (the solvers copy what they change)."""
    stats, handles, alias = {}, [], {}
    last = {"x": None, "name": None}

    def hook(name, s, args):
        x = args[0]
        if name not in alias:  # the first call decides: the previous hook's input, or a new one
            alias[name] = (alias.get(last["name"]) or last["name"]) if x is last["x"] else None
        if alias[name] is None:
            s.add(x)
        elif x is not last["x"]:
            raise RuntimeError(f"{name} shared its input with {alias[name]} on the first batch but not later")
        last["x"], last["name"] = x, name

    for name, mod in modules.items():
        ref = next(iter(mod.buffers()), None) if not isinstance(mod, nn.Linear) else mod.weight
        stats[name] = s = InputStats(mod.in_features, ref.device, hessian, norms)
        handles.append(mod.register_forward_hook(lambda m, args, out, n=name, s=s: hook(n, s, args)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
        for name, root in alias.items():
            if root is not None:
                stats[name] = stats[root]


class _Catcher(nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, cos, sin, mask, cache):
        if self.inputs:  # batches of the same length share one rotary table instead of a copy each
            _, prev_cos, prev_sin = self.inputs[-1]
            if torch.equal(cos, prev_cos) and torch.equal(sin, prev_sin):
                cos, sin = prev_cos, prev_sin
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
    moved: dict[int, torch.Tensor] = {}  # a tensor shared by several batches is moved once

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    return [tuple(move(t) for t in inp) for inp in catcher.inputs]


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


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; elsewhere nothing).

    A layer's activations come and go in blocks of a few MiB that glibc keeps for reuse; over 30 layers the
    kept memory fragments and the RSS creeps up (SmolLM2 Wanda, 128 x 512 tokens: peak RSS 1913 MiB without,
    1737 MiB with a trim after each layer, at the same speed). Frees nothing that is in use."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig), or None without glibc."""
    with suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the hooked linears have all run."""


@contextmanager
def _stop_after(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, a forward ends (raising _Stop) as soon as every module of `modules` has run once."""
    seen: set[int] = set()

    def hook(m, args, out):
        seen.add(id(m))
        if len(seen) == len(modules):
            seen.clear()
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_until_stop(step: Callable, x, cos, sin) -> None:
    with suppress(_Stop):
        step(x, cos, sin)


def _run_caching(block: nn.Module, linear: nn.Module, step: Callable, inputs: list) -> list | None:
    """Run the half on every batch, keeping `linear`'s inputs when the block's output is `linear`'s own
    output (o_proj, down_proj): the half's output with `linear` replaced is then x + new_linear(cached),
    without running the rest of the half again. -> cached inputs per batch, or None (not that shape)."""
    cached, outs, ok = [], [], []

    def keep(m, args, out):
        cached.append(args[0])
        outs.append(out)

    def check(m, args, out):
        ok.append(bool(outs) and out is outs[-1])

    h1, h2 = linear.register_forward_hook(keep), block.register_forward_hook(check)
    try:
        for x, cos, sin in inputs:
            step(x, cos, sin)
            outs.clear()
    finally:
        h1.remove(), h2.remove()
    return cached if len(ok) == len(inputs) == len(cached) and all(ok) else None


@torch.no_grad()
def calibrate_layerwise(
    graph,
    tokens: torch.Tensor,
    compress: Compress,
    *,
    hessian: bool = True,
    norms: bool = True,
    prepare: Callable[[nn.Module, Callable], None] | None = None,
    true_sequential: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    label: str = "calibrating layers",
) -> None:
    """Compress every decoder linear of `graph` in place, layer by layer.

    tokens: [N, S] calibration sequences. compress(full_name, module, stats) -> replacement module;
    stats carry the Hessian when `hessian` and the input norms when `norms`.
    prepare(layer, collect), if given, runs first on each layer; collect(names) -> {name: InputStats}
    runs the layer once with hooks on those linears (SmoothQuant uses it to fold scales).

    Work saved without changing a result: a group's calibration forward stops once its linears have
    run, and a half whose last group is its output linear (o_proj; not down_proj, whose inputs are wider
    than the activations kept) propagates from that linear's cached inputs instead of running the whole
    half again.
    """
    home = next(graph.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = first_layer_inputs(graph, tokens, batch_size, device)
    n_layers = len(graph.model.layers)
    for idx, layer in enumerate(graph.model.layers):
        layer.to(device)
        if prepare is not None:
            def collect(names: list[str], layer=layer) -> dict[str, InputStats]:
                mods = {n: layer.get_submodule(n) for n in names}
                with capture_inputs(mods, hessian=False) as stats, _stop_after(list(mods.values())):
                    for x, cos, sin in inputs:
                        _run_until_stop(lambda x, cos, sin: layer(x, cos, sin, None, None), x, cos, sin)
                return stats

            prepare(layer, collect)
        for prefix, block, step in halves(layer):
            groups, cached = linear_groups(block, true_sequential), None
            for gi, group in enumerate(groups):
                mods = {n: block.get_submodule(n) for n in group}
                with capture_inputs(mods, hessian, norms) as stats:
                    if gi < len(groups) - 1:  # later groups still to come: stop after this one's linears
                        with _stop_after(list(mods.values())):
                            for x, cos, sin in inputs:
                                _run_until_stop(step, x, cos, sin)
                    elif len(group) == 1 and mods[group[0]].in_features <= mods[group[0]].out_features:
                        # (a wider input, down_proj's, would cost more memory than the activations kept)
                        cached = _run_caching(block, mods[group[0]], step, inputs)
                    else:
                        for x, cos, sin in inputs:
                            step(x, cos, sin)
                for n in group:
                    name = f"model.layers.{idx}.{prefix}.{n}"
                    block.set_submodule(n, compress(name, block.get_submodule(n), stats[n]))
                del stats
            out_linear = block.get_submodule(groups[-1][0]) if cached is not None else None
            for i, (x, cos, sin) in enumerate(inputs):  # in place: one batch's activations at a time
                y = x + out_linear(cached[i]) if cached is not None else step(x, cos, sin)
                inputs[i] = (y, cos, sin)
                if cached is not None:
                    cached[i] = None
        layer.to(home)
        release_free_memory()
        if progress is not None:
            progress(label, idx + 1, n_layers)
