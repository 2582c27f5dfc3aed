"""Fixtures for the one-shot tests: a made-up layer with correlated inputs."""

import pytest
import torch
from oneshot_helpers import correlated_inputs, hessian


@pytest.fixture
def layer_data():
    """(W [32, 128], X [1024, 128], H [128, 128])."""
    x = correlated_inputs(1024, 128)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    return w, x, hessian(x)
