"""Layer-by-layer calibration: inputs propagated, hooks in one place, groups in sequential order."""

import torch
from oneshot_helpers import tiny_graph, tokens
from torch import nn

from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, set_block
from llmcompress.oneshot.calibrate import (
    InputStats,
    calibrate_layerwise,
    capture_inputs,
    first_layer_inputs,
    halves,
    linear_groups,
)


@torch.no_grad()
def test_first_layer_inputs_and_halves_reproduce_the_model():
    graph, toks = tiny_graph(), tokens()
    inputs = first_layer_inputs(graph, toks, batch_size=4, device="cpu")
    assert [x.shape for x, _, _ in inputs] == [(4, 24, 64), (2, 24, 64)]
    outs = []
    for x, cos, sin in inputs:
        for layer in graph.model.layers:
            for _, _, step in halves(layer):
                x = step(x, cos, sin)
        outs.append(graph.lm_head(graph.model.norm(x)))
    torch.testing.assert_close(torch.cat(outs), graph(toks).logits, rtol=0, atol=0)
    assert isinstance(graph.model.layers[0], nn.Module) and len(graph.model.layers) == 2  # layers restored


@torch.no_grad()
def test_first_layer_inputs_share_one_rotary_table_across_equal_batches():
    graph, toks = tiny_graph(), tokens()
    inputs = first_layer_inputs(graph, toks, batch_size=2, device="cpu")  # 3 batches of 2
    assert len(inputs) == 3
    assert all(cos is inputs[0][1] and sin is inputs[0][2] for _, cos, sin in inputs)  # stored once
    assert inputs[0][0] is not inputs[1][0]


def test_linear_groups():
    layer = tiny_graph().model.layers[0]
    assert linear_groups(layer.self_attn) == [["q_proj", "k_proj", "v_proj"], ["o_proj"]]
    assert linear_groups(layer.mlp) == [["gate_proj", "up_proj"], ["down_proj"]]
    assert linear_groups(layer.mlp, true_sequential=False) == [["gate_proj", "up_proj", "down_proj"]]


def test_hooks_are_removed():
    lin = nn.Linear(8, 4)
    with capture_inputs({"l": lin}) as stats:
        lin(torch.randn(3, 8))
    lin(torch.randn(5, 8))
    assert stats["l"].n == 3 and not lin._forward_hooks


@torch.no_grad()
def test_sequential_order_and_propagation():
    """Every linear is compressed once, in q/k/v -> o -> gate/up -> down order, layer after layer; each
    sees inputs produced by the already-compressed linears before it."""
    graph, toks = tiny_graph(), tokens()
    dense = tiny_graph()  # the same weights
    seen, hessians = [], {}

    def compress(name, module, stats):
        seen.append(name)
        hessians[name] = stats.H.clone()
        if name.split(".")[-1] not in ("q_proj", "k_proj"):  # keep the attention pattern
            module.weight.mul_(0.5)  # a visible change
        return module

    progress = []
    calibrate_layerwise(graph, toks, compress, batch_size=4, progress=lambda *a: progress.append(a))
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert seen == [f"model.layers.{i}.{n}" for i in range(2) for n in order]
    assert progress == [("calibrating layers", 1, 2), ("calibrating layers", 2, 2)]
    # o_proj's Hessian comes from the halved v_proj: a quarter of the dense model's
    x = first_layer_inputs(dense, toks, 6, "cpu")[0]
    layer = dense.model.layers[0]
    with capture_inputs({"o": layer.self_attn.o_proj}) as stats:
        layer(*x, None, None)
    torch.testing.assert_close(hessians["model.layers.0.self_attn.o_proj"], stats["o"].H / 4, rtol=1e-4, atol=1e-6)
    # layer 1 saw layer 0's compressed output
    for name, lin in dense.model.layers[0].named_modules():
        if isinstance(lin, nn.Linear) and name.split(".")[-1] not in ("q_proj", "k_proj"):
            lin.weight.mul_(0.5)
    x1 = dense.model.layers[0](*x, None, None)
    with capture_inputs({"q": dense.model.layers[1].self_attn.q_proj}) as stats:
        dense.model.layers[1](x1, *x[1:], None, None)
    torch.testing.assert_close(hessians["model.layers.1.self_attn.q_proj"], stats["q"].H, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_heterogeneous_layers():
    """No-op and linear-replacement blocks are handled (nothing to hook, or one linear)."""
    graph, toks = tiny_graph(layers=3), tokens()
    set_block(graph, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="linear")))
    seen = []
    calibrate_layerwise(graph, toks, lambda n, m, s: seen.append(n) or m, hessian=False)
    assert "model.layers.1.mlp.linear_mlp" in seen and not any(n.startswith("model.layers.1.self_attn") for n in seen)
    assert len(seen) == 7 + 1 + 7


def test_linears_fed_the_same_tensor_share_their_statistics():
    attn = tiny_graph().model.layers[0].self_attn
    x = torch.randn(2, 24, 64)
    cos, sin = torch.ones(2, 24, 16), torch.zeros(2, 24, 16)
    with capture_inputs({n: attn.get_submodule(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}) as stats:
        attn(x, cos, sin, None, None)
        attn(x * 2, cos, sin, None, None)
    assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"] and stats["o_proj"] is not stats["q_proj"]
    alone = InputStats(64, "cpu")
    alone.add(x), alone.add(x * 2)
    torch.testing.assert_close(stats["v_proj"].H, alone.H, rtol=0, atol=0)
    assert stats["k_proj"].n == 2 * 48


def _naive_layerwise(graph, toks, compress, batch_size):
    """The driver without shortcuts: every group's pass runs the whole half, each linear keeps its own
    statistics, and each half is run again to propagate."""
    inputs = first_layer_inputs(graph, toks, batch_size, "cpu")
    for idx, layer in enumerate(graph.model.layers):
        for prefix, block, step in halves(layer):
            for group in linear_groups(block):
                stats, hooks = {}, []
                for n in group:
                    mod = block.get_submodule(n)
                    stats[n] = s = InputStats(mod.in_features, "cpu")
                    hooks.append(mod.register_forward_hook(lambda m, a, o, s=s: s.add(a[0])))
                for x, cos, sin in inputs:
                    step(x, cos, sin)
                for h in hooks:
                    h.remove()
                for n in group:
                    block.set_submodule(n, compress(f"model.layers.{idx}.{prefix}.{n}", block.get_submodule(n), stats[n]))
            inputs = [(step(x, cos, sin), cos, sin) for x, cos, sin in inputs]


@torch.no_grad()
def test_shortcuts_change_no_result():
    """Early-stopped group passes, shared statistics and o_proj's cached-input propagation give the
    Hessians and weights of the plain driver, bit for bit."""
    results = []
    for driver in (calibrate_layerwise, _naive_layerwise):
        graph, toks, hessians = tiny_graph(), tokens(), {}

        def compress(name, module, stats):
            hessians[name] = stats.H.clone()
            module.weight.copy_(torch.round(module.weight * 8) / 8)  # every linear changes, o_proj and down_proj too
            return module

        if driver is calibrate_layerwise:
            driver(graph, toks, compress, batch_size=4)
        else:
            driver(graph, toks, compress, 4)
        results.append((hessians, graph.state_dict()))
    (h1, w1), (h2, w2) = results
    assert h1.keys() == h2.keys() and len(h1) == 14
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], rtol=0, atol=0, msg=k)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0, msg=k)
