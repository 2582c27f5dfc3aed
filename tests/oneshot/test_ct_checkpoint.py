"""compressed-tensors checkpoints: save -> load gives identical packed buffers and identical logits."""

import json

import pytest
import torch
from oneshot_helpers import tiny_graph, tokens

from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, load, save, set_block
from llmcompress.oneshot import PruneConfig, QuantizeConfig, prune_model, quantize_model

CASES = {
    "sparse24": [PruneConfig(method="magnitude")],
    "int4_sym": [QuantizeConfig(method="rtn", group_size=32)],
    "int4_asym": [QuantizeConfig(method="rtn", group_size=64, symmetric=False)],
    "sparse24_int4": [PruneConfig(method="magnitude"), QuantizeConfig(method="rtn", group_size=32, symmetric=False)],
    "int8": [QuantizeConfig(scheme="w8a16", method="rtn")],
    "w8a8": [QuantizeConfig(scheme="w8a8", method="rtn")],
}
FORMATS = {"sparse24": "sparse-24-bitmask", "int4_sym": "pack-quantized", "int4_asym": "pack-quantized",
           "sparse24_int4": "pack-quantized", "int8": "int-quantized", "w8a8": "int-quantized"}


def _compress(graph, steps):
    for cfg in steps:
        (prune_model if isinstance(cfg, PruneConfig) else quantize_model)(graph, None, cfg)
    return graph


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(case, tmp_path):
    graph = _compress(tiny_graph(), CASES[case])
    save(graph, tmp_path / "m")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"]
    if case == "sparse24":
        assert "config_groups" not in qc
        assert qc["sparsity_config"]["format"] == FORMATS[case]
        assert qc["sparsity_config"]["targets"] == ["Linear"] and qc["sparsity_config"]["ignore"] == ["lm_head"]
    else:
        assert qc["format"] == FORMATS[case] and qc["quantization_status"] == "compressed"
        group = qc["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
        assert group["weights"]["num_bits"] == (4 if "int4" in case else 8)
        assert (group["input_activations"] is not None) == (case == "w8a8")
    assert (qc["sparsity_config"].get("sparsity_structure") == "2:4") == case.startswith("sparse24")
    back = load(str(tmp_path / "m"))
    _assert_identical(graph, back)
    toks = tokens()
    assert torch.equal(graph(toks).logits, back(toks).logits)


def test_heterogeneous_mixed_formats_round_trip(tmp_path):
    """A Nemotron-NAS layout with two quantization groups and a 2:4-only layer."""
    graph = tiny_graph(layers=3)
    set_block(graph, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="mlp",
                                                                                          intermediate_size=96)))
    quantize_model(graph, None, QuantizeConfig(method="rtn", group_size=32))
    layer = graph.model.layers[2].self_attn
    layer.o_proj = QuantLinear.from_dense(torch.nn.Linear(64, 64, bias=False), "int8")
    layer.q_proj = Sparse24Linear.from_dense(torch.nn.Linear(64, 64, bias=False), prune=True)
    save(graph, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and "auto_map" in raw
    qc = raw["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert qc["sparsity_config"]["targets"] == ["Linear"]  # and all 17 other linears ignored
    assert len(qc["sparsity_config"]["ignore"]) == 17 and "model.layers.2.self_attn.q_proj" not in qc["ignore"]
    assert qc["config_groups"]["group_1"]["targets"] == ["model.layers.2.self_attn.o_proj"]
    back = load(str(tmp_path / "m"))
    _assert_identical(graph, back)
    toks = tokens()
    assert torch.equal(graph(toks).logits, back(toks).logits)


def test_transformers_reads_our_int4_checkpoint(tmp_path):
    """Tools built for compressed-tensors read the files: transformers dequantizes them to our weights."""
    from transformers import AutoModelForCausalLM

    graph = _compress(tiny_graph(layers=1), CASES["int4_sym"])
    save(graph, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    toks = tokens()
    torch.testing.assert_close(hf(toks).logits, graph(toks).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_scheme_is_refused(tmp_path):
    graph = _compress(tiny_graph(layers=1), CASES["int4_sym"])
    save(graph, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="llmcompress loads int4 group-wise weights"):
        load(str(tmp_path / "m"))
