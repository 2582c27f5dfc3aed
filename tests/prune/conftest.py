"""Fixtures of the ZipLM tests."""

import pytest
import torch

from llmcompress.models import load


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    """The 4-layer tiny Llama as a graph, and 8 random calibration windows of 32 tokens."""
    g = load(str(tiny_hf_dir))
    tokens = torch.randint(0, g.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    return g, tokens
