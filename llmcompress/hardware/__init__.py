"""Hardware cost model: per-block latency/memory tables measured on a device, and predictions from them."""

from llmcompress.hardware.cost_model import CostModel
from llmcompress.hardware.profile import (
    CostTable,
    Entry,
    ProfileSettings,
    Timing,
    load_table,
    measure_model,
    measure_speedup,
    profile,
    save_table,
)

__all__ = ["CostModel", "CostTable", "Entry", "ProfileSettings", "Timing", "load_table", "measure_model",
           "measure_speedup", "profile", "save_table"]
