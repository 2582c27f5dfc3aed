"""Quantization math: RTN is the kernels' quantizer bit for bit, GPTQ beats it, codes pack losslessly,
masks are kept, group sizes that do not fit are refused, SmoothQuant preserves the function."""

import pytest
import torch
from oneshot_helpers import correlated_inputs, rel_error
from torch import nn

from llmcompress.formats import QuantLinear
from llmcompress.oneshot import QuantSpec, gptq_quantize, parse_pattern, rtn_quantize, sparsegpt_prune
from llmcompress.oneshot.rtn import check_group_size
from llmcompress.oneshot.smoothquant import smooth_layer, smoothing_scales

SPECS = [QuantSpec(4, 32, True), QuantSpec(4, 64, False), QuantSpec(4, 128, True), QuantSpec(8, None)]


def _fmt(spec, sparse=False):
    return ("sparse24_int4" if sparse else "int4") if spec.bits == 4 else "int8"


def _module(q, spec, keep=None):
    return QuantLinear.from_codes(_fmt(spec, keep is not None), q.codes, q.scales, q.zeros, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_is_the_kernels_quantizer(spec, dtype):
    lin = nn.Linear(256, 24).to(dtype)
    q = rtn_quantize(lin.weight.detach(), spec)
    ours = _module(q, spec)
    ref = QuantLinear.from_dense(lin, _fmt(spec), group_size=spec.group_size or 128, symmetric=spec.symmetric)
    assert ours.state_dict().keys() == ref.state_dict().keys() - {"bias"}
    for name, buf in ours.state_dict().items():
        assert buf.dtype == ref.state_dict()[name].dtype and torch.equal(buf, ref.state_dict()[name]), name
    assert torch.equal(ours.dequantize(), q.weight)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_beats_rtn_and_packs_losslessly(spec, act_order, layer_data):
    w, x, h = layer_data
    q = gptq_quantize(w, h, spec, blocksize=48, act_order=act_order)
    mod = _module(q, spec)
    assert torch.equal(mod.dequantize(), q.weight)  # codes + scales are exactly the kernel's format
    lo, hi = spec.qrange
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    assert rel_error(x, w, q.weight) < 0.85 * rel_error(x, w, rtn_quantize(w, spec).weight)


def test_gptq_group_scales_fit_their_groups(layer_data):
    """Scales come from the (updated) group: no code is clipped far outside the grid."""
    w, _, h = layer_data
    spec = QuantSpec(4, 32, False)
    q = gptq_quantize(w, h, spec)
    assert q.scales.shape == (32, 4) and q.zeros.shape == (32, 4) and q.zeros.dtype == torch.uint8
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_24_then_int4_keeps_the_mask(method, layer_data):
    w, x, h = layer_data
    w24, keep = sparsegpt_prune(w, h, parse_pattern("2:4"))
    spec = QuantSpec(4, 64, False)
    q = gptq_quantize(w24, h, spec, keep) if method == "gptq" else rtn_quantize(w24, spec, keep)
    assert bool((q.weight[~keep] == 0).all())  # pruned weights were not refilled
    mod = _module(q, spec, keep)
    assert mod.fmt == "sparse24_int4" and torch.equal(mod.dequantize(), q.weight)
    if method == "gptq":  # the update still helps within the mask
        assert rel_error(x, w24, q.weight) < rel_error(x, w24, rtn_quantize(w24, spec, keep).weight)


def test_unfixed_gptq_would_refill_pruned_weights(layer_data):
    """The check above can fail: without the mask GPTQ's updates make pruned weights nonzero."""
    w, _, h = layer_data
    w24, keep = sparsegpt_prune(w, h, parse_pattern("2:4"))
    q = gptq_quantize(w24, h, QuantSpec(4, 64, False))
    assert int((q.weight[~keep] != 0).sum()) > 0


def test_group_size_that_does_not_fit_is_refused():
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the input width 576 of "
                                         r"model\.layers\.0\.self_attn\.q_proj; sizes that fit: 32, 64"):
        check_group_size(name, 576, QuantSpec(4, 128))
    check_group_size(name, 576, QuantSpec(4, 64))
    check_group_size(name, 576, QuantSpec(8, None))  # per channel: any width
    with pytest.raises(ValueError, match="one of 32, 64, 128"):
        QuantSpec(4, 48)


def test_smoothquant_preserves_the_layer_and_flattens_activations():
    from llmcompress.models import build
    from llmcompress.models.loading import config_from_hf
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    layer = build(config_from_hf(cfg)).model.layers[0]
    x = correlated_inputs(64, 32).reshape(2, 32, 32)
    x[..., 3] *= 30  # an outlier channel
    cos, sin = torch.ones(2, 32, 8), torch.zeros(2, 32, 8)
    ref = layer(x, cos, sin, None, None)
    h = layer.input_layernorm(x)
    mid = layer.mlp.up_proj(layer.post_attention_layernorm(ref))  # only its shape matters below
    absmax = {"self_attn.q_proj": h.abs().flatten(0, 1).amax(0),
              "mlp.gate_proj": layer.post_attention_layernorm(x).abs().flatten(0, 1).amax(0),
              "mlp.down_proj": torch.rand(mid.shape[-1]) + 0.5}
    names = smooth_layer(layer, absmax, alpha=0.5)
    assert set(names) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                          "mlp.up_proj", "mlp.down_proj"}
    torch.testing.assert_close(layer(x, cos, sin, None, None), ref, rtol=1e-4, atol=1e-4)
    h2 = layer.input_layernorm(x).abs().flatten(0, 1).amax(0)
    assert h2.max() / h2.median() < 0.5 * (absmax["self_attn.q_proj"].max() / absmax["self_attn.q_proj"].median())
    s = smoothing_scales(torch.tensor([4.0, 0.0]), [torch.tensor([[1.0, 2.0]])], 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0]))
