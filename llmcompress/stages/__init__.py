"""Pipeline stages. A recipe's `stages:` list is validated against the union of these classes."""

from typing import Annotated, Union

from pydantic import Field

from llmcompress.stages.base import Stage, StageContext
from llmcompress.stages.eval import EvalStage
from llmcompress.stages.prune_layers import PruneLayersStage

STAGE_TYPES = (EvalStage, PruneLayersStage)
AnyStage = Annotated[Union[STAGE_TYPES], Field(discriminator="type")]

__all__ = ["AnyStage", "EvalStage", "PruneLayersStage", "STAGE_TYPES", "Stage", "StageContext"]
