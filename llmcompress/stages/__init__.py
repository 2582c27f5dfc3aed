"""Pipeline stages. A recipe's `stages:` list is validated against the union of these classes."""

from typing import Annotated, Union

from pydantic import Field

from llmcompress.stages.base import Stage, StageContext
from llmcompress.stages.draft import DraftStage
from llmcompress.stages.eval import EvalStage
from llmcompress.stages.oneshot import PruneStage, QuantizeStage
from llmcompress.stages.prune_layers import PruneLayersStage

STAGE_TYPES = (EvalStage, PruneLayersStage, PruneStage, QuantizeStage, DraftStage)
AnyStage = Annotated[Union[STAGE_TYPES], Field(discriminator="type")]

__all__ = ["AnyStage", "DraftStage", "EvalStage", "PruneLayersStage", "PruneStage", "QuantizeStage", "STAGE_TYPES",
           "Stage", "StageContext"]
