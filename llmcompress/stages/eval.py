"""`eval` stage: measure the current model (it is not changed)."""

from __future__ import annotations

from typing import ClassVar, Literal

from llmcompress.evaluation import EvalConfig, evaluate
from llmcompress.stages.base import Stage, StageContext


class EvalStage(Stage, EvalConfig):
    type: Literal["eval"] = "eval"
    changes_model: ClassVar[bool] = False

    def run(self, graph, ctx: StageContext):
        cfg = EvalConfig(**self.model_dump(exclude={"type", "name"}))
        heldout = ctx.corpus.heldout_stream() if cfg.perplexity else None
        report = evaluate(graph, graph.tokenizer, cfg, heldout, ctx.base_dir, ctx.progress)
        return graph, report
