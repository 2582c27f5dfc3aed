"""Block library: the variant vocabulary, the channel-importance rule and the saved library."""

import pytest
import torch

from puzzle_helpers import tiny_parent, tiny_tokens
from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, set_block
from llmcompress.puzzle import BlockLibrary, LibraryConfig, build_library
from llmcompress.puzzle.library import attention_library, channel_importance, ffn_library, top_channels, variant_name


def test_vocabulary():
    att = attention_library(AttentionConfig(num_heads=9, num_kv_heads=3))
    assert [variant_name(a) for a in att] == ["gqa_9q_3kv", "gqa_9q_1kv", "linear", "noop"]
    att = attention_library(AttentionConfig(num_heads=32, num_kv_heads=8), linear=False, noop=False)
    assert [variant_name(a) for a in att] == ["gqa_32q_8kv", "gqa_32q_4kv", "gqa_32q_2kv", "gqa_32q_1kv"]
    ffn = ffn_library(FFNConfig(intermediate_size=1536), [0.875, 0.75, 0.5, 0.25, 0.1])
    assert [variant_name(f) for f in ffn] == ["mlp_1536", "mlp_1344", "mlp_1152", "mlp_768", "mlp_384", "mlp_152",
                                              "linear", "noop"]
    with pytest.raises(ValueError, match="divisors"):
        attention_library(AttentionConfig(num_heads=8, num_kv_heads=4), kv_heads=[3])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        LibraryConfig(ffn_fractions=[1.0])


def test_channel_importance_rule():
    act = torch.tensor([1.0, 2.0, 0.5])  # RMS of each channel's activation
    w = torch.tensor([[3.0, 0.0, 4.0], [4.0, 1.0, 0.0]])  # [D=2, I=3]: column norms 5, 1, 4
    assert torch.equal(channel_importance(act, w), torch.tensor([5.0, 2.0, 2.0]))
    assert top_channels(torch.tensor([2, 0, 1]), 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="cannot keep"):
        top_channels(torch.tensor([2, 0, 1]), 4)


def test_importance_matches_definition(parent, library):
    # layer 0's down_proj input on the calibration tokens, computed by hand
    tokens = tiny_tokens(4)
    layer = parent.model.layers[0]
    with torch.no_grad():
        h = parent(tokens, output_hidden_states=True).hidden_states[0]
        m = h + layer.self_attn(layer.input_layernorm(h), *_rope(parent, tokens), None, None)
        z = layer.post_attention_layernorm(m)
        x = torch.nn.functional.silu(layer.mlp.gate_proj(z)) * layer.mlp.up_proj(z)  # [N, S, I]
    want = x.pow(2).mean((0, 1)).sqrt() * layer.mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(library.importance[0], want, rtol=1e-4, atol=1e-6)
    assert torch.equal(library.channel_order[0], want.argsort(descending=True))


def _rope(graph, tokens):
    from llmcompress.oneshot.calibrate import first_layer_inputs

    _, cos, sin = first_layer_inputs(graph, tokens, len(tokens), "cpu")[0]
    return cos, sin


def test_save_load_and_channels(library, tmp_path):
    library.save(tmp_path)
    again = BlockLibrary.load(tmp_path)
    assert again.attention == library.attention and again.ffn == library.ffn
    assert again.fingerprint() == library.fingerprint()
    half = FFNConfig(intermediate_size=64)
    keep = again.channels(1, half)
    assert keep.tolist() == sorted(library.channel_order[1][:64].tolist())
    assert again.channels(1, library.parent.ffn) is None and again.channels(1, FFNConfig(kind="linear")) is None
    with pytest.raises(ValueError, match="build it first"):
        BlockLibrary.load(tmp_path / "nothing")


def test_heterogeneous_parent_is_refused():
    g = tiny_parent(layers=2)
    set_block(g, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(intermediate_size=128)))
    with pytest.raises(ValueError, match="layer 1 is noop"):
        build_library(g, tiny_tokens(2), LibraryConfig())
