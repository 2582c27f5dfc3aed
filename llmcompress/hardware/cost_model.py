"""Predict a model graph's latency and memory from a profiled `CostTable`.

    layer(attention a, ffn f) = entry(attention a) + entry(ffn f) - entry(noop)
    model = head + sum over layers

Each part entry was timed as a whole decoder layer with the other part no-op, so the empty layer (the
per-layer call overhead, both `noop` entries) is subtracted once per layer. A layer that was removed from the
graph costs nothing; a layer with both parts no-op costs the empty layer. The head holds the per-forward fixed
cost (embedding, rotary tables, final norm, lm_head, greedy argmax).

An FFN intermediate size that was not profiled is interpolated linearly between the nearest profiled sizes
below and above (same format); latency of a matmul is close to linear in its width between nearby sizes, and
parameter bytes are exactly linear. Anything else missing raises ValueError saying how to profile it.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from llmcompress.hardware.profile import (
    HEAD,
    CostTable,
    Entry,
    Timing,
    attention_variant,
    entry_key,
    ffn_variant,
)
from llmcompress.models.graph import AttentionConfig, BlockConfig, FFNConfig, ModelGraph, blocks

NOOP = "noop"


def lerp_timing(a: Timing, b: Timing, w: float) -> Timing:
    f = lambda x, y: (1 - w) * x + w * y  # noqa: E731
    return Timing(median_ms=f(a.median_ms, b.median_ms), min_ms=f(a.min_ms, b.min_ms),
                  max_ms=f(a.max_ms, b.max_ms), samples=min(a.samples, b.samples))


def lerp_entry(a: Entry, b: Entry, w: float, variant: str) -> Entry:
    """The entry a fraction w of the way from a to b (w=0: a, w=1: b), for batches both have."""
    f = lambda x, y: round((1 - w) * x + w * y)  # noqa: E731
    return Entry(part=a.part, variant=variant, format=a.format, params=f(a.params, b.params),
                 param_bytes=f(a.param_bytes, b.param_bytes),
                 kv_bytes_per_token=f(a.kv_bytes_per_token, b.kv_bytes_per_token),
                 prefill={k: lerp_timing(a.prefill[k], b.prefill[k], w) for k in a.prefill if k in b.prefill},
                 decode={k: lerp_timing(a.decode[k], b.decode[k], w) for k in a.decode if k in b.decode})


def part_format(module: nn.Module | None) -> str:
    """The single weight format of a part's linear layers ('none' for a no-op part)."""
    if module is None:
        return "none"
    from llmcompress.formats import QuantLinear, Sparse24Linear, weight_format

    fmts = {weight_format(m) for m in module.modules() if isinstance(m, (nn.Linear, QuantLinear, Sparse24Linear))}
    if len(fmts) != 1:
        raise ValueError(f"{type(module).__name__} mixes weight formats {sorted(fmts)}; the cost table "
                         "times one format per attention or FFN part")
    return fmts.pop()


def graph_layout(graph: ModelGraph) -> list[tuple[BlockConfig, str, str]]:
    """(block, attention format, ffn format) per layer of a graph."""
    return [(b, part_format(layer.self_attn), part_format(layer.mlp))
            for b, layer in zip(blocks(graph), graph.model.layers)]


class CostModel:
    """Sums table entries over a graph's layers. See the module docstring for the formula."""

    def __init__(self, table: CostTable):
        self.table = table

    def _missing(self, part: str, name: str, fmt: str, extra: str = "") -> ValueError:
        s = self.table.settings
        have = sorted({e.variant for e in self.table.entries.values() if e.part == part and e.format == fmt})
        why = self.table.skipped.get(entry_key(part, name, fmt))
        return ValueError(
            f"{part} variant {name} in format {fmt} is not in the cost table for {self.table.device} "
            f"({self.table.dtype}){'; it was skipped: ' + why if why else ''}{extra}; profiled: "
            f"{', '.join(have) or 'none'}. Profile a model containing it: llmcompress profile --model <model> "
            f"--formats {fmt} --batch {','.join(map(str, s.batches))} --prompt-len {s.prompt_len} "
            f"--gen-len {s.gen_len} (profile adds every variant the model uses)")

    def entry(self, part: str, variant: AttentionConfig | FFNConfig, fmt: str = "dense") -> Entry:
        """The table entry of one part, interpolating FFN sizes between profiled ones."""
        name = attention_variant(variant) if part == "attention" else ffn_variant(variant)
        fmt = "none" if variant.kind == NOOP else fmt
        found = self.table.entries.get(entry_key(part, name, fmt))
        if found is not None:
            return found
        if entry_key(part, name, fmt) in self.table.skipped:  # could not be built: do not interpolate over it
            raise self._missing(part, name, fmt)
        if part == "ffn" and variant.kind == "mlp":
            sizes = sorted(int(e.variant[4:]) for e in self.table.entries.values()
                           if e.part == "ffn" and e.format == fmt and e.variant.startswith("mlp_"))
            lo = max((s for s in sizes if s < variant.intermediate_size), default=None)
            hi = min((s for s in sizes if s > variant.intermediate_size), default=None)
            if lo is None or hi is None:
                span = f" (interpolation covers {sizes[0]}..{sizes[-1]})" if sizes else ""
                raise self._missing(part, name, fmt, span)
            a = self.table.entries[entry_key("ffn", f"mlp_{lo}", fmt)]
            b = self.table.entries[entry_key("ffn", f"mlp_{hi}", fmt)]
            return lerp_entry(a, b, (variant.intermediate_size - lo) / (hi - lo), name)
        raise self._missing(part, name, fmt)

    def _check(self, batch: int, prompt_len: int | None, gen_len: int | None) -> tuple[int, int]:
        s = self.table.settings
        if batch not in s.batches:
            raise ValueError(f"batch {batch} was not profiled (table has {s.batches}); "
                             f"profile again with --batch {','.join(map(str, sorted({*s.batches, batch})))}")
        prompt_len = s.prompt_len if prompt_len is None else prompt_len
        gen_len = s.gen_len if gen_len is None else gen_len
        if (prompt_len, gen_len) != (s.prompt_len, s.gen_len):
            raise ValueError(f"the table was profiled at prompt_len={s.prompt_len}, gen_len={s.gen_len}; "
                             f"profile again with --prompt-len {prompt_len} --gen-len {gen_len}")
        return prompt_len, gen_len

    def layer_costs(self, layout: Sequence[tuple[BlockConfig, str, str]], batch: int) -> list[dict]:
        """Per layer: prefill_ms, decode_ms, params, param_bytes, kv_bytes_per_token."""
        empty = self.table.entries.get(entry_key("attention", NOOP, "none"))
        if empty is None:
            raise ValueError("the cost table has no empty-layer entry (attention:noop:none); profile it again")
        rows = []
        for block, att_fmt, ffn_fmt in layout:
            a = self.entry("attention", block.attention, att_fmt)
            f = self.entry("ffn", block.ffn, ffn_fmt)
            if batch not in a.prefill or batch not in f.prefill:
                raise ValueError(f"batch {batch} was not profiled for {block.describe()}")
            rows.append({
                "block": block.describe(),
                "prefill_ms": a.prefill[batch].median_ms + f.prefill[batch].median_ms - empty.prefill[batch].median_ms,
                "decode_ms": a.decode[batch].median_ms + f.decode[batch].median_ms - empty.decode[batch].median_ms,
                "params": a.params + f.params,
                "param_bytes": a.param_bytes + f.param_bytes,
                "kv_bytes_per_token": a.kv_bytes_per_token + f.kv_bytes_per_token,
            })
        return rows

    def predict(self, model: ModelGraph | Sequence[BlockConfig], batch: int = 1, prompt_len: int | None = None,
                gen_len: int | None = None, fmt: str = "dense") -> dict:
        """Predicted latency and memory of a graph (formats read from its modules) or of a list of blocks (all
        in `fmt`). prompt_len/gen_len default to, and must equal, the table's.
        -> prefill_ms, decode_ms_per_token, total_ms (prefill + gen_len decode steps), params, param_bytes,
           kv_bytes_per_token (per sequence), kv_bytes (batch * (prompt_len + gen_len) tokens), layers."""
        prompt_len, gen_len = self._check(batch, prompt_len, gen_len)
        if isinstance(model, nn.Module):
            layout = graph_layout(model)
        else:
            layout = [(b, fmt, fmt) for b in model]
        head = self.table.entries.get(entry_key("head", HEAD, "dense"))
        if head is None:
            raise ValueError("the cost table has no head entry; profile it again")
        rows = self.layer_costs(layout, batch)
        prefill = head.prefill[batch].median_ms + sum(r["prefill_ms"] for r in rows)
        decode = head.decode[batch].median_ms + sum(r["decode_ms"] for r in rows)
        kv_per_token = sum(r["kv_bytes_per_token"] for r in rows)
        return {
            "device": self.table.device, "dtype": self.table.dtype, "batch": batch, "prompt_len": prompt_len,
            "gen_len": gen_len, "layers": len(rows), "prefill_ms": prefill, "decode_ms_per_token": decode,
            "total_ms": prefill + gen_len * decode, "params": head.params + sum(r["params"] for r in rows),
            "param_bytes": head.param_bytes + sum(r["param_bytes"] for r in rows),
            "kv_bytes_per_token": kv_per_token, "kv_bytes": kv_per_token * batch * (prompt_len + gen_len),
        }
