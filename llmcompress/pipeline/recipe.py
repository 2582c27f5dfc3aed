"""Recipes: YAML files loaded with `yaml.safe_load` into typed models (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmcompress.data import DataConfig
from llmcompress.stages import STAGE_TYPES, AnyStage


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("default", description="'default', a local model folder, a .gguf file or a hub id")
    output: str = Field(..., description="run folder (checkpoints, reports, summary)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[AnyStage] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique_names(self):
        labels = [s.label for s in self.stages]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"stage names {sorted(dup)} are used twice; give each stage a distinct `name:`")
        return self


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides; list items by index (`stages.1.num_layers=4`) or by stage name
    (`stages.prune.num_layers=4`). Values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. --set data.num_samples=64)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                if last:
                    node[idx] = _parse_value(value)
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node.setdefault(part, {})
            else:
                raise ValueError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
    return raw


def _list_index(items: list, part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and part in (item.get("name"), item.get("type")):
            return i
    raise ValueError(f"--set {key}: no stage {part!r}; use a stage index (0..{len(items) - 1}) or name")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe. Returns it and the folder relative paths resolve against."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a mapping with model, output, data and stages")
    raw = apply_overrides(raw, list(overrides))
    try:
        return Recipe.model_validate(raw), path.parent.resolve()
    except ValidationError as err:
        raise ValueError(f"recipe {path}: {explain(err)}") from None


def explain(err: ValidationError) -> str:
    """One line for the first problem of a pydantic validation error, with a hint."""
    e = err.errors()[0]
    tags = {t.model_fields["type"].default for t in STAGE_TYPES}
    loc = ".".join(str(x) for i, x in enumerate(e["loc"]) if not (i == 2 and x in tags))
    if e["type"] == "extra_forbidden":
        return f"unknown key {loc!r}; check the spelling against the stage's fields (llmcompress run --help)"
    if e["type"] == "union_tag_invalid":
        return f"{loc}: unknown stage type {e['input'].get('type')!r}; {e['msg'].split('match any of the expected tags: ')[-1]}"
    if e["type"] == "union_tag_not_found":
        return f"{loc}: each stage needs a `type:`"
    got = f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else ""
    return f"{loc}: {e['msg']}{got}"
