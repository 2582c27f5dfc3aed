"""Puzzle (Bercovich et al. 2024): distillation-based NAS for inference-optimised LLMs.

library (variants per layer) -> bld (blockwise local distillation) -> score (replace-1-block KL + costs)
-> mip (mixed-integer search under budgets) -> context (the MIP again around its solution, with scores
measured in it) -> gkd (assemble the chosen blocks, global distillation).
"""

from llmcompress.puzzle.bld import BLDConfig, normalized_mse, run_bld
from llmcompress.puzzle.context import search_in_context
from llmcompress.puzzle.gkd import GKDConfig, assemble, gkd_loss, train_gkd
from llmcompress.puzzle.library import BlockLibrary, LibraryConfig, build_library
from llmcompress.puzzle.mip import Budget, Budgets, greedy, search, solve, uniform
from llmcompress.puzzle.score import ScoreConfig, load_library, save_library, score_blocks, scored_library

__all__ = ["BLDConfig", "BlockLibrary", "Budget", "Budgets", "GKDConfig", "LibraryConfig", "ScoreConfig", "assemble",
           "build_library", "gkd_loss", "greedy", "load_library", "normalized_mse", "run_bld", "save_library",
           "score_blocks", "scored_library", "search", "search_in_context", "solve", "train_gkd", "uniform"]
