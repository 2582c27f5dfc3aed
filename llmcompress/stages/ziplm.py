"""`ziplm` stage: structured OBS pruning to several speed-up targets in one calibration pass.

Every target's model is written under `output` (with the database, so a rerun resumes); the pipeline goes on
with the model of `continue_with` (a target speed-up, default the first)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcompress.prune.ziplm_family import ZipLMConfig, profile_for, run_ziplm
from llmcompress.stages.base import Stage, StageContext


class ZipLMStage(Stage, ZipLMConfig):
    type: Literal["ziplm"] = "ziplm"
    cost_table: str | None = Field(None, description="cost table JSON of the target device (llmcompress profile); "
                                                     "none: profile the model here first")
    output: str = Field("ziplm", description="folder of the database and of one checkpoint per target")
    continue_with: float | None = Field(None, description="target speed-up whose model the pipeline continues "
                                                          "with (default: the first)")

    def run(self, graph, ctx: StageContext):
        from llmcompress.hardware.profile import load_table, save_table

        cfg = ZipLMConfig(**self.model_dump(include=set(ZipLMConfig.model_fields)))
        pick = self.continue_with if self.continue_with is not None else cfg.speedups[0]
        if pick not in cfg.speedups:
            raise ValueError(f"continue_with {pick} is not one of the speedups {cfg.speedups}")
        out = Path(self.output).expanduser()
        if self.cost_table is not None:
            table = load_table(ctx.base_dir / self.cost_table if not Path(self.cost_table).is_absolute()
                               and (ctx.base_dir / self.cost_table).exists() else self.cost_table)
        elif (out / "cost_table.json").exists():
            table = load_table(out / "cost_table.json")
        else:
            table = profile_for(graph, cfg, progress=ctx.progress)
            out.mkdir(parents=True, exist_ok=True)
            save_table(table, out / "cost_table.json", overwrite=True)
        tokens = ctx.corpus.train_batches(cfg.num_samples, cfg.seq_len)
        rows, report = run_ziplm(graph, tokens, cfg, table, out, progress=ctx.progress)
        chosen = next(r for r in rows if r["target_speedup"] == pick)
        return chosen["model"], report | {"continued_with": pick}
