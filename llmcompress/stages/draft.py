"""`draft` stage: distil a speculative-decoding draft of the pipeline's current model (DistillSpec).

The model itself is not changed; the draft is written to `output` (relative to the working directory),
with its training checkpoint, so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from llmcompress.speculative.train import DistillConfig, distill
from llmcompress.stages.base import Stage, StageContext


class DraftStage(Stage, DistillConfig):
    type: Literal["draft"] = "draft"
    changes_model: ClassVar[bool] = False
    init: str = Field("layers:6", description="layers:K, important:K, feature:K (of the current model) or a model "
                      "spec")
    output: str = Field("draft", description="folder of the distilled draft and its training checkpoint")
    num_samples: int = Field(64, gt=0, description="training sequences drawn from the data section")

    def run(self, graph, ctx: StageContext):
        cfg = DistillConfig(**self.model_dump(include=set(DistillConfig.model_fields)))
        return graph, distill(graph, self.init, ctx.corpus, cfg, Path(self.output).expanduser(), self.num_samples,
                              ctx.progress)
