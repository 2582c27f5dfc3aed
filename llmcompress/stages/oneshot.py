"""`prune` and `quantize` stages: one-shot compression calibrated layer by layer (llmcompress.oneshot)."""

from __future__ import annotations

from typing import Literal

from llmcompress.oneshot import (
    PruneConfig,
    QuantizeConfig,
    check_prunable,
    check_quantizable,
    prune_model,
    quantize_model,
)
from llmcompress.stages.base import Stage, StageContext


class PruneStage(Stage, PruneConfig):
    type: Literal["prune"] = "prune"

    def run(self, graph, ctx: StageContext):
        cfg = PruneConfig(**self.model_dump(exclude={"type", "name"}))
        check_prunable(graph, cfg)  # before the calibration data is loaded
        tokens = None if cfg.method == "magnitude" else ctx.corpus.train_batches(cfg.num_samples, cfg.seq_len)
        return graph, prune_model(graph, tokens, cfg, ctx.progress)


class QuantizeStage(Stage, QuantizeConfig):
    type: Literal["quantize"] = "quantize"

    def run(self, graph, ctx: StageContext):
        cfg = QuantizeConfig(**self.model_dump(exclude={"type", "name"}))
        check_quantizable(graph, cfg)
        needs_data = cfg.method == "gptq" or cfg.smoothquant_alpha is not None
        tokens = ctx.corpus.train_batches(cfg.num_samples, cfg.seq_len) if needs_data else None
        return graph, quantize_model(graph, tokens, cfg, ctx.progress)
