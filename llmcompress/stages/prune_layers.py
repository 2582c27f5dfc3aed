"""`prune_layers` stage: drop the N layers whose removal changes the next-token distribution least."""

from __future__ import annotations

from typing import Literal

import torch

from pydantic import Field

from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, remove_layers, set_block
from llmcompress.prune.layers import choose_layers, kl_div
from llmcompress.stages.base import Stage, StageContext


class PruneLayersStage(Stage):
    type: Literal["prune_layers"] = "prune_layers"
    num_layers: int = Field(..., gt=0, description="how many decoder layers to drop")
    num_samples: int = Field(8, gt=0, description="calibration sequences used to score layers")
    seq_len: int = Field(256, gt=1, description="tokens per calibration sequence")
    iterative: bool = Field(False, description="rescore after each removal (num_layers times the cost)")
    as_noop: bool = Field(False, description="keep dropped layers as no-op blocks (Nemotron-NAS layout) "
                                             "instead of removing them")
    batch_size: int = Field(4, gt=0)

    @torch.no_grad()
    def run(self, graph, ctx: StageContext):
        tokens = ctx.corpus.train_batches(self.num_samples, self.seq_len)
        progress = lambda done, total: ctx.progress("scoring layers", done, total)
        layers, scores = choose_layers(graph, tokens, self.num_layers, self.iterative, self.batch_size, progress)
        ref = graph(tokens[: self.batch_size]).logits.detach()
        if self.as_noop:
            noop = BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="noop"))
            for i in layers:
                set_block(graph, i, noop)
        else:
            remove_layers(graph, layers)
        kl = kl_div(ref, graph(tokens[: self.batch_size]).logits.detach()).item()
        return graph, {
            "removed_layers": layers,
            "removal_kl": dict(zip(map(str, layers), scores)),
            "kl_after": kl,
            "layers_left": len(graph.model.layers) - (len(layers) if self.as_noop else 0),
            "calibration": f"{len(tokens)} sequences of {self.seq_len} tokens",
        }
