"""Linear layers in compressed weight formats, built from nn.Linear and run by our kernels.

Formats: "dense" (nn.Linear itself), "sparse24" (2:4), "int8" (W8A16), "w8a8" (int8 weights and
dynamic per-token int8 activations), "int4" (W4A16, group-wise, sym/asym) and "sparse24_int4".
Packed tensors are buffers, so they are in the state_dict; the layouts are documented in the kernel
files (llmcompress.kernels.*). forward runs the Triton kernel on CUDA and the exact torch reference
elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcompress.kernels.int8 import quantize_int8, w8a8_matmul, w8a8_matmul_ref, w8a16_matmul, w8a16_matmul_ref
from llmcompress.kernels.sparse24_matmul import sparse24_matmul, sparse24_matmul_ref
from llmcompress.kernels.sparse24_pack import (
    compress_24,
    compress_24_ref,
    decompress_24_ref,
    meta_cols,
    pack_meta,
    prune_24,
)
from llmcompress.kernels.sparse24_w4a16 import (
    dequantize_sparse24_int4,
    quantize_sparse24_int4,
    sparse24_w4a16_matmul,
    sparse24_w4a16_matmul_ref,
)
from llmcompress.kernels.w4a16 import (
    check_group_size,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    w4a16_matmul,
    w4a16_matmul_ref,
)

WEIGHT_FORMATS = ("dense", "sparse24", "int8", "w8a8", "int4", "sparse24_int4")


def _bias_buffer(module: nn.Module, bias: torch.Tensor | None) -> None:
    module.register_buffer("bias", None if bias is None else bias.detach().clone())


class Sparse24Linear(nn.Module):
    """y = x @ W^T + b with W 2:4 sparse: values [N, K/2] + meta int32 [N, ceil(K/32)]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer(
            "meta", torch.zeros(out_features, meta_cols(in_features), dtype=torch.int32, device=device)
        )
        _bias_buffer(self, torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, prune: bool = False) -> Sparse24Linear:
        """The weight must already be 2:4 (ValueError otherwise) unless prune=True (magnitude)."""
        w = linear.weight.detach()
        w = prune_24(w) if prune else w
        mod = cls(linear.in_features, linear.out_features, bias=False, dtype=w.dtype, device=w.device)
        mod.values, mod.meta = compress_24(w.contiguous()) if w.is_cuda else compress_24_ref(w)
        _bias_buffer(mod, linear.bias)
        return mod

    @property
    def weight_format(self) -> str:
        return "sparse24"

    def dequantize(self) -> torch.Tensor:
        return decompress_24_ref(self.values, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = sparse24_matmul if x.is_cuda else sparse24_matmul_ref
        return matmul(x.contiguous(), self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# fmt -> (Triton kernel, torch reference, packed buffer names, takes group_size)
_OPS = {
    "int4": (w4a16_matmul, w4a16_matmul_ref, ("qweight", "scales", "zeros"), True),
    "sparse24_int4": (sparse24_w4a16_matmul, sparse24_w4a16_matmul_ref, ("qweight", "meta", "scales", "zeros"), True),
    "int8": (w8a16_matmul, w8a16_matmul_ref, ("qweight", "scale"), False),
    "w8a8": (w8a8_matmul, w8a8_matmul_ref, ("qweight", "scale"), False),
}


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W quantized: fmt "int4", "sparse24_int4" (group_size, symmetric),
    "int8" (W8A16) or "w8a8" (per-channel weights, dynamic per-token activations)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "int4",
        group_size: int = 128,
        symmetric: bool = False,
        bias: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if fmt not in _OPS:
            raise ValueError(f"unknown quantized format {fmt!r}; choose one of {sorted(_OPS)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.group_size, self.symmetric = (group_size, symmetric) if _OPS[fmt][3] else (None, True)
        n, k, kw = out_features, in_features, {"device": device}
        if fmt in ("int8", "w8a8"):
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, **kw))
            self.register_buffer("scale", torch.ones(n, dtype=dtype, **kw))
        else:
            check_group_size(k, group_size)
            per_word = 16 if fmt == "sparse24_int4" else 8
            self.register_buffer("qweight", torch.zeros(n, k // per_word, dtype=torch.int32, **kw))
            if fmt == "sparse24_int4":
                self.register_buffer("meta", torch.zeros(n, meta_cols(k), dtype=torch.int32, **kw))
            self.register_buffer("scales", torch.ones(n, k // group_size, dtype=dtype, **kw))
            zeros = None if symmetric else torch.full((n, k // group_size), 8, dtype=torch.uint8, **kw)
            self.register_buffer("zeros", zeros)
        _bias_buffer(self, torch.zeros(n, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, fmt: str = "int4", group_size: int = 128, symmetric: bool = False, prune: bool = False
    ) -> QuantLinear:
        """Round-to-nearest quantization of linear.weight. For sparse24_int4 the weight must be 2:4
        already (ValueError otherwise) unless prune=True."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, fmt, group_size, symmetric, False, w.dtype, w.device)
        if fmt in ("int8", "w8a8"):
            mod.qweight, mod.scale = quantize_int8(w)
        elif fmt == "int4":
            mod.qweight, mod.scales, mod.zeros = quantize_int4(w, group_size, symmetric)
        else:
            w = prune_24(w) if prune else w
            mod.qweight, mod.meta, mod.scales, mod.zeros = quantize_sparse24_int4(w, group_size, symmetric)
        _bias_buffer(mod, linear.bias)
        return mod

    @classmethod
    def from_codes(
        cls,
        fmt: str,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Pack integer codes computed elsewhere (e.g. by GPTQ), bit for bit; the dtype is the scales'.

        int4 / sparse24_int4: codes uint8 [N, K] in 0..15, scales [N, K/G] (G follows), zeros uint8
        [N, K/G] or None (symmetric, zero code 8); sparse24_int4 also takes keep: bool [N, K] with
        exactly 2 True in every group of 4 (the codes outside it are ignored).
        int8 / w8a8: codes int8 [N, K], scales [N].
        """
        if fmt not in _OPS:
            raise ValueError(f"unknown quantized format {fmt!r}; choose one of {sorted(_OPS)}")
        n, k = codes.shape
        group_size = k // scales.shape[1] if _OPS[fmt][3] else 128
        mod = cls(k, n, fmt, group_size, zeros is None, False, scales.dtype, "meta")
        if fmt in ("int8", "w8a8"):
            mod.qweight, mod.scale = codes.to(torch.int8).contiguous(), scales.contiguous()
        elif fmt == "int4":
            mod.qweight, mod.scales, mod.zeros = pack_int4(codes), scales.contiguous(), zeros
        else:
            if keep is None or keep.shape != codes.shape:
                raise ValueError(f"sparse24_int4 needs keep: a bool [N, K] 2:4 mask of shape {tuple(codes.shape)}")
            g = keep.reshape(n, k // 4, 4)
            if not bool((g.sum(-1) == 2).all()):
                raise ValueError("keep is not a 2:4 mask: every group of 4 along K must keep exactly 2 weights")
            pos = torch.arange(4, device=keep.device).expand(n, k // 4, 4)[g].reshape(n, k // 4, 2)
            mod.qweight, mod.meta = pack_int4(codes[keep].reshape(n, k // 2)), pack_meta(pos)
            mod.scales, mod.zeros = scales.contiguous(), zeros
        _bias_buffer(mod, bias)
        return mod

    @property
    def weight_format(self) -> str:
        return self.fmt

    def dequantize(self) -> torch.Tensor:
        """The dense weight [N, K] the layer multiplies by."""
        if self.fmt == "int4":
            return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
        if self.fmt == "sparse24_int4":
            return dequantize_sparse24_int4(self.qweight, self.meta, self.scales, self.zeros, self.group_size)
        return (self.qweight.float() * self.scale.float()[:, None]).to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, ref, names, grouped = _OPS[self.fmt]
        args = [getattr(self, name) for name in names] + ([self.group_size] if grouped else [])
        return (kernel if x.is_cuda else ref)(x.contiguous(), *args, bias=self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}, symmetric={self.symmetric}" if self.group_size else ""
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, fmt={self.fmt}{group}, bias={self.bias is not None}"


def make_linear(linear: nn.Linear, fmt: str, **kw) -> nn.Module:
    """nn.Linear -> the module of weight format fmt (one of WEIGHT_FORMATS); kw go to from_dense."""
    if fmt == "dense":
        return linear
    if fmt == "sparse24":
        return Sparse24Linear.from_dense(linear, **kw)
    if fmt in _OPS:
        return QuantLinear.from_dense(linear, fmt, **kw)
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


def weight_format(module: nn.Module) -> str:
    """The WEIGHT_FORMATS name of a linear module."""
    if isinstance(module, QuantLinear):
        return module.fmt
    if isinstance(module, Sparse24Linear):
        return "sparse24"
    if isinstance(module, nn.Linear):
        return "dense"
    raise ValueError(
        f"{type(module).__name__} is not a linear layer; expected nn.Linear, Sparse24Linear or QuantLinear"
    )
