"""What every pipeline stage is: a typed config (its recipe section) with a `run` method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

Progress = Callable[[str, int, int], None]


@dataclass
class StageContext:
    """What a stage may ask the pipeline for; everything is loaded lazily, once."""

    corpus_fn: Callable[[], object]
    teacher_fn: Callable[[], torch.nn.Module]
    base_dir: Path = Path(".")
    progress: Progress = lambda label, done, total: None
    _cache: dict = field(default_factory=dict)

    @property
    def corpus(self):
        if "corpus" not in self._cache:
            self._cache["corpus"] = self.corpus_fn()
        return self._cache["corpus"]

    @property
    def teacher(self):
        if "teacher" not in self._cache:
            self._cache["teacher"] = self.teacher_fn()
        return self._cache["teacher"]


class Stage(BaseModel, ABC):
    """Base of all stages. Subclasses add their fields and set `type` to a Literal of their name."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None

    changes_model: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]

    @abstractmethod
    def run(self, graph, ctx: StageContext) -> tuple[object, dict]:
        """Return the (possibly changed) graph and a JSON-ready report."""
