"""Measure, on one device, the latency and memory of every block variant: the cost model's table.

What one entry means (all timings are medians over `repeats` sweeps, with min/max):
- attention variant: a decoder layer holding that attention (with its norm and residual add) and a no-op FFN;
  FFN variant: a layer with no-op attention and that FFN. The two `noop` entries are the empty layer (both
  parts no-op): the per-layer call overhead. A block costs attention + ffn - empty (see cost_model.py).
- head: everything outside the layers, timed as the model with zero layers: embedding, rotary tables, final
  norm, lm_head over every position (prefill) or over the new token plus the greedy argmax (decode).
- prefill[b]: one forward over [b, prompt_len] tokens without a KV cache (as `evaluation.measure_speed`).
- decode[b]: one step of [b, 1] tokens against a KV cache already holding `decode_context = prompt_len +
  gen_len // 2` tokens: the mean context while generating gen_len tokens, so that
  prefill + gen_len * decode approximates a whole generation.
- Decode is memory-bound. A layer timed alone would find its weights in the last-level cache, which the full
  model (larger than that cache) does not, so decode sweeps run round-robin over enough copies of the layer
  (weights + KV cache) to touch `working_set_mb`: by default as many bytes as the whole model's weights (what
  one decode step of it reads), capped at twice the last-level cache (CPU L3, GPU L2), beyond which more copies
  change nothing. Prefill reuses each weight b * prompt_len times and is compute-bound: it times one copy.
- A sample is the time of one sweep (torch.cuda.synchronize before and after on CUDA) divided by its calls.
  Every variant is built first, then timed interleaved: each of `warmup + repeats` rounds (the warm-up ones
  untimed) runs every (variant, batch, prefill/decode) sweep once, so a machine whose speed drifts while it
  profiles slows every entry alike (timed one after the other, SmolLM2's full-width FFN came out 43% slower
  than its 87.5% one on a shared VM). Memory: all variants' copies at once, about (variants + 1) x
  working_set_mb. The clock is wall time, or on CPU optionally this process's CPU time
  (`clock="process"`): with one torch thread that is the latency the sweep would have had without other
  programs competing for the cores, which makes tables reproducible on a shared machine.
  Weights are random: dense latency does not depend on their values.
- Linear layers of a part are converted to each weight format with `formats.make_linear` (int4 group size: the
  largest of 128, 64, 32 dividing the input size; 2:4 formats are magnitude-pruned first). A (variant, format)
  that cannot be built is listed under `skipped` with the reason.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from llmcompress.evaluation import device_name
from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, ModelGraph, blocks, build, count_params
from llmcompress.models.modeling_llmcompress import DecoderLayer, LlmcNasConfig, rope_inv_freq

FFN_FRACTIONS = (1.0, 0.875, 0.75, 0.5, 0.25, 0.1)
NOOP_ATTENTION = AttentionConfig(kind="noop")
NOOP_FFN = FFNConfig(kind="noop")
HEAD = "embed_norm_lm_head"
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- the table
class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    median_ms: float = Field(ge=0)
    min_ms: float = Field(ge=0)
    max_ms: float = Field(ge=0)
    samples: int = Field(ge=0)


class Entry(BaseModel):
    """One part of a block (or the head) in one weight format; prefill/decode keyed by batch size."""

    model_config = ConfigDict(extra="forbid")
    part: Literal["attention", "ffn", "head"]
    variant: str = Field(description="gqa_<H>q_<KV>kv, mlp_<intermediate>, linear, noop, or embed_norm_lm_head")
    format: str = Field(description="weight format of the part's linear layers; 'none' for noop")
    params: int = Field(ge=0)
    param_bytes: int = Field(ge=0, description="bytes of the part's state dict (weights, scales, norms)")
    kv_bytes_per_token: int = Field(0, ge=0, description="KV-cache bytes per sequence per cached token")
    prefill: dict[int, Timing] = Field(description="batch -> one forward over [batch, prompt_len]")
    decode: dict[int, Timing] = Field(description="batch -> one decode step at decode_context cached tokens")


class ProfileSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    batches: list[int]
    prompt_len: int
    gen_len: int
    decode_context: int = Field(description="cached tokens before the timed decode step: prompt_len + gen_len // 2")
    formats: list[str]
    ffn_fractions: list[float]
    repeats: int
    warmup: int
    working_set_mb: float = Field(description="decode sweeps cycle through layer copies totalling at least this")
    clock: Literal["wall", "process"] = Field("wall", description="wall time, or this process's CPU time (CPU)")
    threads: int = Field(description="torch.get_num_threads() while profiling")
    torch_version: str


class CostTable(BaseModel):
    """{"device", "dtype", "settings", "entries": {"<part>:<variant>:<format>": Entry}, "skipped": {key: why}}"""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    device: str
    dtype: str
    settings: ProfileSettings
    entries: dict[str, Entry]
    skipped: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        for key, e in self.entries.items():
            if key != entry_key(e.part, e.variant, e.format):
                raise ValueError(f"entry {key!r} is filed under the wrong key; expected "
                                 f"{entry_key(e.part, e.variant, e.format)!r}")
        return self


def entry_key(part: str, variant: str, fmt: str) -> str:
    return f"{part}:{variant}:{fmt}"


def save_table(table: CostTable, path: str | Path, overwrite: bool = False) -> None:
    """Write the table as JSON, atomically (temporary file renamed into place)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(table.model_dump_json(indent=2))
    os.replace(tmp, path)


def load_table(path: str | Path) -> CostTable:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cost table {path} does not exist; create it with `llmcompress profile --out {path}`")
    return CostTable.model_validate_json(path.read_text())


# ----------------------------------------------------------------------------- variants (pure)
def attention_variant(a: AttentionConfig) -> str:
    return f"gqa_{a.num_heads}q_{a.num_kv_heads}kv" if a.kind == "gqa" else a.kind


def ffn_variant(f: FFNConfig) -> str:
    return f"mlp_{f.intermediate_size}" if f.kind == "mlp" else f.kind


def attention_variants(num_heads: int, num_kv_heads: int) -> list[AttentionConfig]:
    """The parent; fewer KV heads (each divisor of the parent's) with all query heads; the same with whole
    query groups removed (queries per KV head kept); linear; no-op. E.g. 9q/3kv -> 9/3, 9/1, 3/1, linear, noop."""
    rep = num_heads // num_kv_heads
    out = []
    for kv in (k for k in range(num_kv_heads, 0, -1) if num_kv_heads % k == 0):
        out.append(AttentionConfig(num_heads=num_heads, num_kv_heads=kv))
        if kv < num_kv_heads:
            out.append(AttentionConfig(num_heads=rep * kv, num_kv_heads=kv))
    return out + [AttentionConfig(kind="linear"), NOOP_ATTENTION]


def ffn_sizes(intermediate_size: int, fractions: Sequence[float], multiple: int = 8) -> list[int]:
    """Intermediate sizes at the given fractions of the parent's, rounded to a multiple of `multiple`."""
    sizes = {max(multiple, round(f * intermediate_size / multiple) * multiple) for f in fractions}
    return sorted(sizes, reverse=True)


def decode_context(prompt_len: int, gen_len: int) -> int:
    """Cached tokens at the timed decode step: the mean context over gen_len steps after the prompt."""
    return prompt_len + gen_len // 2


def copies_for(bytes_per_copy: int, working_set_bytes: float, max_copies: int = 256) -> int:
    """How many copies of a layer a decode sweep cycles through so that its working set exceeds the cache."""
    if bytes_per_copy <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(working_set_bytes / bytes_per_copy)))


def summarize(samples_s: Sequence[float]) -> Timing:
    ms = [1000 * s for s in samples_s]
    return Timing(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), samples=len(ms))


def kv_bytes_per_token(a: AttentionConfig, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of every KV head for one token of one sequence."""
    if a.kind != "gqa":
        return 0
    return 2 * a.num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def state_bytes(module: nn.Module) -> int:
    """Bytes of the state dict, counting shared tensors (tied embeddings) once."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def default_working_set_mb(device: torch.device) -> float:
    """Twice the last-level cache: the GPU's L2, or the CPU's L3 from sysfs (256 MiB if unknown)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).L2_cache_size / 2**20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return 2 * int(size[:-1]) * units[size[-1]] / 2**20 if size[-1] in units else 2 * int(size) / 2**20
    return 256.0


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def check_clock(clock: str, device: torch.device) -> Callable[[], float]:
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    if clock == "process" and device.type != "cpu":
        raise ValueError("the process clock measures CPU time; on a GPU use the wall clock")
    if clock == "process" and torch.get_num_threads() != 1:
        raise ValueError(f"the process clock adds up the CPU time of all {torch.get_num_threads()} torch threads; "
                         "use it with one thread (--threads 1) or use the wall clock")
    return CLOCKS[clock]


class Sweep:
    """One timed quantity: `calls` run back to back (sample = their time / len(calls)), `before` untimed ahead
    of each run (e.g. to cut KV caches back to their starting length)."""

    def __init__(self, calls: Sequence[Callable[[], object]], before: Callable[[], None] | None = None):
        self.calls, self.before, self.samples = list(calls), before, []


def run_sweeps(sweeps: Sequence[Sweep], repeats: int, warmup: int, device: torch.device, clock: str = "wall",
               progress: Callable[[int, int], None] | None = None) -> list[Timing]:
    """Time every sweep `repeats` times (after `warmup` untimed rounds), round-robin: each round runs every sweep
    once, from a rotating start. A shared machine's speed drifts by tens of percent within minutes; timed one after
    the other, whichever entries fell in a slow minute would look costlier than the rest, while interleaved every
    entry's median sees the same mix of fast and slow minutes, so their ratios (what a search trades) hold."""
    now = check_clock(clock, device)
    n, rounds = len(sweeps), warmup + repeats
    with torch.no_grad():
        for i in range(rounds):
            for j in range(n):
                s = sweeps[(i + j) % n]
                if s.before is not None:
                    s.before()
                _sync(device)
                t0 = now()
                for call in s.calls:
                    call()
                _sync(device)
                if i >= warmup:
                    s.samples.append((now() - t0) / len(s.calls))
            if progress is not None:
                progress(i + 1, rounds)
    return [summarize(s.samples) for s in sweeps]


def time_calls(calls: Sequence[Callable[[], object]], repeats: int, warmup: int, device: torch.device,
               before: Callable[[], None] | None = None, clock: str = "wall") -> Timing:
    """Per-call latency: each sweep runs every call once; sample = sweep time / len(calls).
    `before` runs untimed ahead of each sweep (e.g. to cut KV caches back to their starting length)."""
    return run_sweeps([Sweep(calls, before)], repeats, warmup, device, clock)[0]


def _rope(config: LlmcNasConfig, batch: int, start: int, length: int, device, dtype):
    # -> cos, sin: [batch, length, head_dim]
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = pos[:, None] * rope_inv_freq(config).to(device)  # [length, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1).expand(batch, length, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------- building variants
def format_kwargs(fmt: str, in_features: int) -> dict:
    """Arguments for `make_linear` when timing: 2:4 formats prune the random weight; int4 picks a group size."""
    kw: dict = {"prune": True} if fmt in ("sparse24", "sparse24_int4") else {}
    if fmt in ("int4", "sparse24_int4"):
        group = next((g for g in (128, 64, 32) if in_features % g == 0), None)
        if group is None:
            raise ValueError(f"{fmt} needs an input size divisible by 32; this layer has {in_features}")
        kw["group_size"] = group
    return kw


def convert_linears(module: nn.Module, fmt: str) -> nn.Module:
    """Replace every nn.Linear below `module` by its `fmt` counterpart (in place)."""
    if fmt == "dense":
        return module
    from llmcompress.formats import make_linear

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make_linear(child, fmt, **format_kwargs(fmt, child.in_features)))
    return module


def make_layer(config: LlmcNasConfig, block: BlockConfig, fmt: str, device, dtype) -> DecoderLayer:
    with torch.device(device):
        layer = DecoderLayer(config, block.to_hf(config.hidden_size), cache_idx=0)
    return convert_linears(layer.to(dtype).eval(), fmt)


def head_model(config: LlmcNasConfig, device, dtype) -> ModelGraph:
    """The model with zero layers: what a forward costs outside the blocks."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers, cfg.block_configs = 0, []
    return build(cfg, dtype, device)


# ----------------------------------------------------------------------------- measuring
def _layer_sweeps(layer: DecoderLayer, config: LlmcNasConfig, kv_per_token: int, batches: Sequence[int],
                  prompt_len: int, context: int, working_set: float, device, dtype
                  ) -> tuple[dict[int, Sweep], dict[int, Sweep]]:
    """batch -> prefill sweep, batch -> decode sweep of one layer (the sweeps hold the layer's copies)."""
    D, hd = config.hidden_size, config.head_dim
    attn = getattr(layer, "self_attn", None)
    n_kv = getattr(attn, "num_kv_heads", 0)
    min_calls = 8 if device.type == "cuda" else 1  # amortise synchronize over several launches
    weights = state_bytes(layer)
    copies = [layer]
    prefill, decode = {}, {}
    for b in batches:
        x = torch.randn(b, prompt_len, D, device=device, dtype=dtype)  # [B, L, D]
        cos, sin = _rope(config, b, 0, prompt_len, device, dtype)  # [B, L, hd]
        prefill[b] = Sweep([lambda x=x, cos=cos, sin=sin: layer(x, cos, sin, None, None)] * min_calls)

        n = copies_for(weights + kv_per_token * b * (context + 1), working_set)
        copies += [copy.deepcopy(layer) for _ in range(n - len(copies))]
        x1 = torch.randn(b, 1, D, device=device, dtype=dtype)  # [B, 1, D]
        cos1, sin1 = _rope(config, b, context, 1, device, dtype)  # [B, 1, hd]
        caches = [None] * n
        if n_kv:
            from transformers import DynamicCache

            k0 = torch.randn(b, n_kv, context, hd, device=device, dtype=dtype)  # [B, Hkv, C, hd]
            caches = []
            for _ in range(n):
                caches.append(DynamicCache())
                caches[-1].update(k0, k0, 0)

        def reset(caches=caches):  # back to `context` cached tokens before each sweep
            for c in caches:
                if c is not None and c.get_seq_length() > context:
                    c.crop(context - c.get_seq_length())

        calls = [(lambda m=m, c=c, x1=x1, cos1=cos1, sin1=sin1: m(x1, cos1, sin1, None, c))
                 for m, c in zip(copies[:n], caches)]
        calls = calls * math.ceil(min_calls / len(calls)) if n_kv == 0 else calls
        decode[b] = Sweep(calls, reset)
    return prefill, decode


def _head_sweeps(config: LlmcNasConfig, batches, prompt_len, working_set, device, dtype
                 ) -> tuple[ModelGraph, dict[int, Sweep], dict[int, Sweep]]:
    from transformers import DynamicCache

    head = head_model(config, device, dtype)
    weights = state_bytes(head)
    min_calls = 8 if device.type == "cuda" else 1
    gen = torch.Generator().manual_seed(0)
    copies = [head] + [copy.deepcopy(head) for _ in range(copies_for(weights, working_set) - 1)]
    prefill, decode = {}, {}
    for b in batches:
        ids = torch.randint(0, config.vocab_size, (b, prompt_len), generator=gen).to(device)  # [B, L]
        prefill[b] = Sweep([lambda ids=ids: head(ids)] * min_calls)
        tok = ids[:, :1]  # [B, 1]

        def step(m, cache, tok=tok):  # the zero-layer model leaves its cache empty: reuse one per copy
            return m(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

        calls = [(lambda m=m, c=DynamicCache(): step(m, c)) for m in copies]
        decode[b] = Sweep(calls * math.ceil(min_calls / len(calls)))
    return head, prefill, decode


def _unique(items):
    return list(dict.fromkeys(items))


def profile(graph: ModelGraph, batches: Sequence[int] = (1,), prompt_len: int = 512, gen_len: int = 128,
            ffn_fractions: Sequence[float] = FFN_FRACTIONS, formats: Sequence[str] = ("dense",),
            repeats: int = 10, warmup: int = 2, working_set_mb: float | None = None, clock: str = "wall",
            model_name: str = "", progress: Callable[[str, int, int], None] | None = None,
            extra_attention: Sequence[AttentionConfig] = ()) -> CostTable:
    """Time every attention and FFN variant of `graph`'s vocabulary (derived from its parent sizes, plus the
    variants it already contains, and `extra_attention`) in every format, on the graph's device and dtype. See the
    module docstring."""
    from llmcompress.formats import WEIGHT_FORMATS

    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batches)}")
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len and gen_len must be at least 1, got {prompt_len} and {gen_len}")
    if not ffn_fractions or not all(0 < f <= 1 for f in ffn_fractions):
        raise ValueError(f"FFN fractions must lie in (0, 1], got {list(ffn_fractions)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    bad = [f for f in formats if f not in WEIGHT_FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown weight format(s) {bad}; choose from {', '.join(WEIGHT_FORMATS)}")
    ref = next(graph.parameters())
    device, dtype, cfg = ref.device, ref.dtype, graph.config
    check_clock(clock, device)
    context = decode_context(prompt_len, gen_len)
    ws_mb = working_set_mb if working_set_mb is not None else \
        min(default_working_set_mb(device), state_bytes(graph) / 2**20)
    progress = progress or (lambda label, done, total: None)

    present = blocks(graph)
    att = _unique(attention_variants(cfg.num_attention_heads, cfg.num_key_value_heads) + [b.attention for b in present]
                  + list(extra_attention))
    ffn = _unique([FFNConfig(intermediate_size=s) for s in ffn_sizes(cfg.intermediate_size, ffn_fractions)]
                  + [FFNConfig(kind="linear"), NOOP_FFN] + [b.ffn for b in present])
    jobs = [("attention", a, f) for a in att if a.kind != "noop" for f in formats] + \
           [("ffn", f, fmt) for f in ffn if f.kind != "noop" for fmt in formats] + [("empty", None, "none")]
    entries, skipped, built = {}, {}, []
    label = f"profiling {len(jobs) + 1} variants on {device_name(device)}"
    ws = ws_mb * 2**20
    for i, (part, variant, fmt) in enumerate(jobs):  # build every variant first: they are timed interleaved
        progress(f"building {len(jobs) + 1} variants", i, len(jobs) + 1)
        block = BlockConfig(attention=variant if part == "attention" else NOOP_ATTENTION,
                            ffn=variant if part == "ffn" else NOOP_FFN)
        name = {"empty": lambda v: "noop", "attention": attention_variant, "ffn": ffn_variant}[part](variant)
        try:
            layer = make_layer(cfg, block, fmt, device, dtype)
        except ValueError as err:
            skipped[entry_key(part, name, fmt)] = str(err)
            continue
        kv = kv_bytes_per_token(block.attention, cfg.head_dim, dtype)
        prefill, decode = _layer_sweeps(layer, cfg, kv, batches, prompt_len, context, ws, device, dtype)
        fields = dict(variant=name, format=fmt, params=count_params(layer), param_bytes=state_bytes(layer),
                      kv_bytes_per_token=kv)
        built.append(((("attention", "ffn") if part == "empty" else (part,)), fields, prefill, decode))
    head, head_prefill, head_decode = _head_sweeps(cfg, batches, prompt_len, ws, device, dtype)
    built.append((("head",), dict(variant=HEAD, format="dense", params=count_params(head),
                                  param_bytes=state_bytes(head)), head_prefill, head_decode))
    sweeps = [sw for _, _, prefill, decode in built for d in (prefill, decode) for sw in d.values()]
    run_sweeps(sweeps, repeats, warmup, device, clock, progress=lambda done, total: progress(label, done, total))
    for parts, fields, prefill, decode in built:
        timed = dict(prefill={b: summarize(sw.samples) for b, sw in prefill.items()},
                     decode={b: summarize(sw.samples) for b, sw in decode.items()})
        for p in parts:
            entries[entry_key(p, fields["variant"], fields["format"])] = Entry(part=p, **fields, **timed)
    del built, sweeps, head
    settings = ProfileSettings(
        model=model_name or str(getattr(graph, "source", "")), hidden_size=cfg.hidden_size, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        batches=list(batches), prompt_len=prompt_len, gen_len=gen_len, decode_context=context,
        formats=list(formats), ffn_fractions=list(ffn_fractions), repeats=repeats, warmup=warmup,
        working_set_mb=ws_mb, clock=clock, threads=torch.get_num_threads(), torch_version=torch.__version__)
    return CostTable(device=device_name(device), dtype=str(dtype).replace("torch.", ""), settings=settings,
                     entries=entries, skipped=skipped)


def measure_model(graph: ModelGraph, batch: int = 1, prompt_len: int = 512, gen_len: int = 128,
                  repeats: int = 3, warmup: int = 1, clock: str = "wall",
                  metrics: Sequence[str] = ("prefill", "decode")) -> dict[str, Timing]:
    """End-to-end latency of the whole model under the table's definitions: prefill = one forward over
    [batch, prompt_len] without cache; decode = mean step time of gen_len greedy steps after a cached prompt.
    metrics: which of the two to measure (the result holds those)."""
    from transformers import DynamicCache

    ref = next(graph.parameters())
    device = ref.device
    now = check_clock(clock, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, graph.config.vocab_size, (batch, prompt_len), generator=gen).to(device)  # [B, L]
    unknown = set(metrics) - {"prefill", "decode"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}: choose from prefill, decode")
    out = {}
    if "prefill" in metrics:
        out["prefill"] = time_calls([lambda: graph(ids)], repeats, warmup, device, clock=clock)
    if "decode" not in metrics:
        return out
    samples = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            cache = DynamicCache()
            tok = graph(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # [B, 1]
            _sync(device)
            t0 = now()
            for _ in range(gen_len):
                tok = graph(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= warmup:
                samples.append((now() - t0) / gen_len)
            del cache
    return out | {"decode": summarize(samples)}


def measure_speedup(reference: ModelGraph, model: ModelGraph, metric: str = "decode", batch: int = 1,
                    prompt_len: int = 512, gen_len: int = 64, rounds: int = 5, clock: str = "wall") -> dict:
    """Speed-up of `model` over `reference` (reference ms / model ms) in `metric`, measured in pairs.

    The speed of a shared machine drifts by tens of percent within minutes, which a reference timed once and
    models timed later turn into errors of the speed-up. Each round therefore times both models back to back
    (order alternating between rounds), after one untimed warm-up run of each; the result is the median over
    rounds of the per-round ratio. -> {"speedup", "reference_ms", "model_ms" (medians), "ratios", "rounds"}"""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: measure at least one round")
    if metric not in ("decode", "prefill"):
        raise ValueError(f"metric {metric!r} is not a latency: choose decode or prefill")

    def once(graph: ModelGraph, warmup: int) -> float:
        t = measure_model(graph, batch=batch, prompt_len=prompt_len, gen_len=gen_len, repeats=1, warmup=warmup,
                          clock=clock, metrics=(metric,))
        return t[metric].median_ms

    once(reference, 0), once(model, 0)  # warm-up (allocator, caches, lazy initialisation)
    ref_ms, model_ms = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ref_ms.append(once(reference, 0))
            model_ms.append(once(model, 0))
        else:
            model_ms.append(once(model, 0))
            ref_ms.append(once(reference, 0))
    ratios = [a / b for a, b in zip(ref_ms, model_ms)]
    return {"speedup": statistics.median(ratios), "reference_ms": statistics.median(ref_ms),
            "model_ms": statistics.median(model_ms), "ratios": ratios, "rounds": rounds}
