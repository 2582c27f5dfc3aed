"""Triton kernels for compressed linear layers (installed as llmcompress.kernels).

One file per kernel, each with its packing format documented at the top, a pure-torch reference
(`*_ref`) and a checked public wrapper:
  sparse24_pack    2:4 compress / decompress (values [N, K/2] + 2-bit positions)
  sparse24_matmul  2:4 weight x dense activation
  w4a16            int4 group-wise weights (sym / asym) x float activations, RTN quantizer
  int8             W8A16 and W8A8 (dynamic per-token activation quantization)
  sparse24_w4a16   2:4 + int4
  ct_convert       lossless conversion to / from compressed-tensors checkpoint tensors
On CPU the kernels run only under TRITON_INTERPRET=1 (tests); modules use the references there.
"""
