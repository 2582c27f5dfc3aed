"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

For a set of linears reading the same input x (K channels), s_j = max|x_j|^α / max_i max|W_i[:, j]|^(1-α);
the input is divided by s and the weights' columns multiplied by s, so the product is unchanged while
per-token int8 activations lose less. The division is folded into whatever produces x:
  q/k/v_proj  <- input_layernorm (its weight / s)
  gate/up_proj <- post_attention_layernorm
  down_proj   <- up_proj (its output rows / s: down's input is silu(gate) * up)
o_proj is not smoothed (its input is the attention output; folding into v_proj breaks with GQA
head sharing), nor are linear-replacement blocks.
"""

from __future__ import annotations

import torch
from torch import nn


def smoothing_scales(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """absmax: [K] max |x_j| over calibration tokens; weights: [N_i, K] -> s: [K] (fp32)."""
    wmax = torch.stack([w.abs().float().amax(0) for w in weights]).amax(0)
    s = absmax.float().clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((absmax > 0) & (wmax > 0), s, torch.ones_like(s))


def smoothing_map(layer: nn.Module) -> list[tuple[nn.Module, str, list[str]]]:
    """(producer module, how to fold, names of the smoothed linears) for one decoder layer."""
    out = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is not None and hasattr(attn, "q_proj"):
        out.append((layer.input_layernorm, "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
    if mlp is not None and hasattr(mlp, "gate_proj"):
        out.append((layer.post_attention_layernorm, "norm", ["mlp.gate_proj", "mlp.up_proj"]))
        out.append((mlp.up_proj, "rows", ["mlp.down_proj"]))
    return out


@torch.no_grad()
def smooth_layer(layer: nn.Module, absmax: dict[str, torch.Tensor], alpha: float) -> list[str]:
    """Apply SmoothQuant in place; absmax: linear name -> [K]. Returns the smoothed linears' names."""
    done = []
    for producer, how, names in smoothing_map(layer):
        linears = [layer.get_submodule(n) for n in names]
        if not all(type(m) is nn.Linear for m in linears + ([producer] if how == "rows" else [])):
            continue  # already compressed: nothing to fold into
        s = smoothing_scales(absmax[names[0]], [m.weight for m in linears], alpha)
        for m in linears:
            m.weight.mul_(s.to(m.weight.dtype)[None, :])
        if how == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype)[:, None])
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        done += names
    return done
