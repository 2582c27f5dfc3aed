"""Fixtures of the speculative-decoding tests."""

from __future__ import annotations

import pytest
import torch

from llmcompress.models import load


@pytest.fixture(scope="module")
def tiny_target(tiny_hf_dir):
    """The 4-layer tiny Llama (with the test tokenizer) as a graph."""
    return load(str(tiny_hf_dir))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one thread is much faster than several competing ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
