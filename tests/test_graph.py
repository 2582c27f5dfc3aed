"""The model graph: parity with transformers, heterogeneous layers, KV cache."""

import pytest
import torch
from _tiny import tiny_llama_config

from llmcompress.models import (AttentionConfig, BlockConfig, FFNConfig, blocks, build, count_params, layer_table,
                                remove_layers, set_block)
from llmcompress.models.loading import _graph_from_state, config_from_hf


def graph_of(hf_model):
    return _graph_from_state(config_from_hf(hf_model.config), dict(hf_model.state_dict()), torch.float32, "cpu")


@pytest.fixture()
def hf_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def greedy_no_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@torch.no_grad()
def test_logits_match_transformers_llama(hf_llama):
    g = graph_of(hf_llama)
    ids = torch.randint(0, 384, (2, 37))
    torch.testing.assert_close(g(ids).logits, hf_llama(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generation_with_cache_matches_transformers(hf_llama):
    g = graph_of(hf_llama)
    ids = torch.randint(0, 384, (1, 9))
    ours = g.generate(ids, max_new_tokens=12, do_sample=False)
    theirs = hf_llama.generate(ids, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()


@torch.no_grad()
def test_qwen2_layout_with_qkv_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = Qwen2ForCausalLM(cfg).eval()
    g = graph_of(hf)
    assert g.config.attention_bias
    ids = torch.randint(0, 200, (1, 20))
    torch.testing.assert_close(g(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_mask_matches_unpadded(hf_llama):
    g = graph_of(hf_llama)
    ids = torch.randint(3, 384, (1, 10))
    padded = torch.cat([torch.full((1, 3), 2), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = g(ids).logits[:, -1]
    b = g(padded, attention_mask=mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def het_graph(hf_llama):
    g = graph_of(hf_llama)
    set_block(g, 0, BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=1),
                                ffn=FFNConfig(intermediate_size=32)))
    set_block(g, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="linear")))
    set_block(g, 2, BlockConfig(attention=AttentionConfig(kind="linear"), ffn=FFNConfig(kind="noop")))
    set_block(g, 3, BlockConfig(attention=AttentionConfig(num_heads=2, num_kv_heads=1),
                                ffn=FFNConfig(intermediate_size=96)))
    return g


@torch.no_grad()
def test_heterogeneous_graph_runs_and_cache_is_exact(hf_llama):
    g = het_graph(hf_llama)
    descr = [b.describe() for b in blocks(g)]
    assert descr == ["gqa 4q/1kv | mlp 32", "noop | linear", "linear | noop", "gqa 2q/1kv | mlp 96"]
    assert g.model.layers[0].mlp.down_proj.weight.shape == (64, 32)
    assert g.model.layers[1].self_attn is None and g.model.layers[2].mlp is None
    # cache slots are compact over the layers that keep a KV cache
    assert [l.self_attn.cache_idx for l in g.model.layers if hasattr(l.self_attn, "cache_idx")] == [0, 1]
    ids = torch.randint(0, 384, (1, 7))
    cached = g.generate(ids, max_new_tokens=10, do_sample=False)
    assert cached.tolist() == greedy_no_cache(g, ids, 10).tolist()
    assert count_params(g) < count_params(graph_of(hf_llama))


@torch.no_grad()
def test_set_block_initialisation(hf_llama):
    g = graph_of(hf_llama)
    old = g.model.layers[0]
    wk, wv = old.self_attn.k_proj.weight.clone(), old.self_attn.v_proj.weight.clone()
    keep = torch.tensor([5, 1, 7, 90])
    gate = old.mlp.gate_proj.weight[keep].clone()
    set_block(g, 0, BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=1),
                                ffn=FFNConfig(intermediate_size=4)), channels=keep)
    new = g.model.layers[0]
    # the two KV heads (16 rows each) are mean-pooled into one
    torch.testing.assert_close(new.self_attn.k_proj.weight, (wk[:16] + wk[16:]) / 2)
    torch.testing.assert_close(new.self_attn.v_proj.weight, (wv[:16] + wv[16:]) / 2)
    assert torch.equal(new.mlp.gate_proj.weight, gate)
    # linear attention = W_O . expand(W_V): equal to full attention on a single token
    g2 = graph_of(g_src := hf_llama)
    layer = g2.model.layers[1]
    x = torch.randn(1, 1, 64)
    cos, sin = torch.ones(1, 1, 16), torch.zeros(1, 1, 16)
    full = layer.self_attn(x, cos, sin, None, None)
    set_block(g2, 1, BlockConfig(attention=AttentionConfig(kind="linear"), ffn=FFNConfig(intermediate_size=96)))
    torch.testing.assert_close(g2.model.layers[1].self_attn(x, cos, sin, None, None), full, atol=1e-5, rtol=0)
    assert g2.model.layers[1].mlp is layer.mlp  # unchanged FFN kept as is


@torch.no_grad()
def test_unchanged_set_block_keeps_outputs(hf_llama):
    g = graph_of(hf_llama)
    ids = torch.randint(0, 384, (1, 12))
    before = g(ids).logits
    set_block(g, 2, blocks(g)[2])
    assert torch.equal(g(ids).logits, before)


@torch.no_grad()
def test_remove_layers(hf_llama):
    g = graph_of(hf_llama)
    remove_layers(g, [0, 2])
    assert len(g.model.layers) == 2 and g.config.num_hidden_layers == 2
    ids = torch.randint(0, 384, (1, 5))
    assert g.generate(ids, max_new_tokens=4, do_sample=False).tolist() == greedy_no_cache(g, ids, 4).tolist()
    with pytest.raises(ValueError, match="do not exist"):
        remove_layers(g, [5])


def test_block_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionConfig(num_heads=9, num_kv_heads=2)
    with pytest.raises(ValueError, match="intermediate_size"):
        FFNConfig(kind="mlp")
    with pytest.raises(ValueError):
        BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="noop"), extra=1)


def test_layer_table_reports_formats(hf_llama):
    rows = layer_table(het_graph(hf_llama))
    assert rows[0]["formats"] == "dense" and rows[0]["ffn"] == "mlp 32"
    assert rows[1]["attention"] == "noop" and rows[1]["params"] == 64 + 64 * 64


def test_build_from_config_roundtrip():
    from llmcompress.models import LlmcNasConfig

    cfg = LlmcNasConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)
    g = build(cfg)
    assert [b.describe() for b in blocks(g)] == ["gqa 2q/1kv | mlp 48"] * 2
    assert g(torch.randint(0, 50, (1, 4))).logits.shape == (1, 4, 50)
