"""`distill` stage: recover the pipeline's compressed model by distillation from the dense teacher
(llmcompress.recover: fake-quant training, local per layer then global, masks and formats kept).

The training checkpoint goes to `checkpoint` (relative to the working directory), so an interrupted
stage resumes where it stopped; the recovered model is the stage's output like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcompress.recover import RecoverConfig, check_recoverable, recover
from llmcompress.stages.base import Stage, StageContext


class DistillStage(Stage, RecoverConfig):
    type: Literal["distill"] = "distill"
    checkpoint: str = Field("recover-checkpoint", description="folder of the training checkpoint (resume)")

    def run(self, graph, ctx: StageContext):
        cfg = RecoverConfig(**self.model_dump(include=set(RecoverConfig.model_fields)))
        teacher = ctx.teacher
        check_recoverable(graph, teacher, cfg)  # before the training data is read
        tokens = ctx.corpus.train_batches(cfg.num_samples, cfg.seq_len)
        report = recover(graph, teacher, tokens, cfg, Path(self.checkpoint).expanduser(), ctx.progress)
        return graph, report | {"checkpoint": self.checkpoint}
