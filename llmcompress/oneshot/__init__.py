"""One-shot compression: pruning (magnitude, Wanda, SparseGPT) and weight quantization (RTN, GPTQ,
W8A8 with optional SmoothQuant), calibrated one decoder layer at a time.

The math lives in pure functions (sparsegpt, wanda, magnitude, gptq, rtn, smoothquant); calibrate
runs them layer by layer; apply holds the typed configs and the graph-level drivers.
"""

from llmcompress.oneshot.apply import (
    CalibrationConfig,
    PruneConfig,
    QuantizeConfig,
    check_prunable,
    check_quantizable,
    prune_model,
    quantize_model,
)
from llmcompress.oneshot.calibrate import InputStats, calibrate_layerwise, capture_inputs
from llmcompress.oneshot.gptq import gptq_quantize
from llmcompress.oneshot.magnitude import Pattern, keep_mask, magnitude_prune, parse_pattern
from llmcompress.oneshot.rtn import Quantized, QuantSpec, rtn_quantize
from llmcompress.oneshot.sparsegpt import sparsegpt_prune
from llmcompress.oneshot.wanda import wanda_prune

__all__ = [
    "CalibrationConfig", "InputStats", "Pattern", "PruneConfig", "QuantSpec", "QuantizeConfig", "Quantized",
    "calibrate_layerwise", "capture_inputs", "check_prunable", "check_quantizable", "gptq_quantize", "keep_mask", "magnitude_prune", "parse_pattern",
    "prune_model", "quantize_model", "rtn_quantize", "sparsegpt_prune", "wanda_prune",
]
