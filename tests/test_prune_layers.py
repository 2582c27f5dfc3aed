"""Layer-removal scoring picks the layers that matter least."""

import pytest
import torch

from llmcompress.models import load
from llmcompress.prune.layers import choose_layers, kl_div, layer_removal_kl


@pytest.fixture()
def graph_with_identity_layer(tiny_hf_dir):
    g = load(str(tiny_hf_dir))
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: removing it changes nothing
        g.model.layers[2].self_attn.o_proj.weight.zero_()
        g.model.layers[2].mlp.down_proj.weight.zero_()
    return g


def test_kl_div_properties():
    a = torch.randn(2, 3, 10)
    assert kl_div(a, a).item() == pytest.approx(0, abs=1e-6)
    assert kl_div(a, torch.randn(2, 3, 10)).item() > 0


def test_identity_layer_is_removed_first(graph_with_identity_layer):
    g = graph_with_identity_layer
    tokens = torch.randint(0, g.config.vocab_size, (4, 16))
    scores = layer_removal_kl(g, tokens, batch_size=3)
    assert scores[2].item() == pytest.approx(0, abs=1e-6)
    assert all(scores[i] > 1e-4 for i in (0, 1, 3))
    assert len(g.model.layers) == 4  # scoring leaves the model intact
    layers, picked = choose_layers(g, tokens, 1)
    assert layers == [2] and picked[0] == pytest.approx(0, abs=1e-6)
    layers, _ = choose_layers(g, tokens, 2, iterative=True)
    assert 2 in layers and len(layers) == 2
    with pytest.raises(ValueError, match="between 1 and 3"):
        choose_layers(g, tokens, 4)
