"""Kernel tests run the Triton kernels on CUDA when present, else in Triton's CPU interpreter."""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before anything imports triton

try:
    import llmcompress.kernels  # noqa: F401  (installed: pip install -e .)
except ModuleNotFoundError:  # a plain checkout: map kernels/ as pyproject's package-dir does
    _root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(_root))
    _spec = importlib.util.spec_from_file_location(
        "llmcompress.kernels", _root / "kernels" / "__init__.py", submodule_search_locations=[str(_root / "kernels")]
    )
    sys.modules["llmcompress.kernels"] = _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
