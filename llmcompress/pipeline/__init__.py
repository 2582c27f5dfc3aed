"""Recipes and the staged, resumable pipeline."""

from llmcompress.pipeline.recipe import Recipe, apply_overrides, load_recipe
from llmcompress.pipeline.run import RunResult, StageResult, markdown_table, run_recipe

__all__ = ["Recipe", "RunResult", "StageResult", "apply_overrides", "load_recipe", "markdown_table", "run_recipe"]
