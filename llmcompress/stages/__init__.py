"""Pipeline stages. A recipe's `stages:` list is validated against the union of these classes."""

from typing import Annotated, Union

from pydantic import Field

from llmcompress.stages.base import Stage, StageContext
from llmcompress.stages.draft import DraftStage
from llmcompress.stages.eval import EvalStage
from llmcompress.stages.oneshot import PruneStage, QuantizeStage
from llmcompress.stages.prune_layers import PruneLayersStage
from llmcompress.stages.puzzle import GKDStage, PuzzleBLDStage, PuzzleLibraryStage, PuzzleMIPStage, PuzzleScoreStage
from llmcompress.stages.recover import DistillStage
from llmcompress.stages.ziplm import ZipLMStage

STAGE_TYPES = (EvalStage, PruneLayersStage, PruneStage, QuantizeStage, DraftStage, DistillStage,
               PuzzleLibraryStage, PuzzleBLDStage, PuzzleScoreStage, PuzzleMIPStage, GKDStage, ZipLMStage)
AnyStage = Annotated[Union[STAGE_TYPES], Field(discriminator="type")]

__all__ = ["AnyStage", "GKDStage", "PuzzleBLDStage", "PuzzleLibraryStage", "PuzzleMIPStage", "PuzzleScoreStage",
           "DistillStage", "DraftStage", "EvalStage", "PruneLayersStage", "PruneStage", "QuantizeStage",
           "STAGE_TYPES", "Stage", "StageContext", "ZipLMStage"]
