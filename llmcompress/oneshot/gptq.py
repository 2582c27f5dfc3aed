"""GPTQ (Frantar et al. 2022): quantize column by column, each column's rounding error absorbed by the
columns not yet quantized (OBS update through the Cholesky factor of the inverse Hessian).

Group scales are computed when their group's first column is reached, from the weights as updated
so far. With act_order, columns go in order of decreasing Hessian diagonal; the kernels' groups are
contiguous in the original order, so the scales are then computed up front from the original weights
(GPTQ's "static groups"). A keep mask stays fixed: pruned weights are quantized to exactly 0 and their
(zero) error is never spread back into them.
"""

from __future__ import annotations

import torch

from llmcompress.oneshot.hessian import inverse_cholesky, prepare_hessian
from llmcompress.oneshot.rtn import Quantized, QuantSpec, qparams, quantize


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    keep: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> Quantized:
    """W: [N, K], H: [K, K], keep: bool [N, K] or None -> Quantized (codes, scales, zeros, weight)."""
    N, K = W.shape
    G = spec.group(K)
    H, W_ = prepare_hessian(H, W)
    keep = torch.ones(N, K, dtype=torch.bool, device=W.device) if keep is None else keep.clone()
    W_ *= keep
    scale = torch.zeros(N, K // G, device=W.device)
    zero = torch.zeros(N, K // G, device=W.device)
    perm = torch.arange(K, device=W.device)
    if act_order:
        scale, zero = qparams(W_.reshape(N, K // G, G), spec, W.dtype)  # static groups [N, K/G]
        perm = torch.argsort(H.diagonal(), descending=True)
        W_, keep, H = W_[:, perm], keep[:, perm], H[perm][:, perm]
    elif G < K:
        blocksize = max(blocksize // G, 1) * G  # a group never straddles two blocks
    U = inverse_cholesky(H, percdamp)  # [K, K], in processing order
    codes = torch.zeros(N, K, device=W.device)  # processing order
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, U1 = W_[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // G
            if not act_order and (i1 + i) % G == 0:  # first column of a group: its scales, from W as updated
                src = W1[:, i:i + G] if G < K else W_
                scale[:, g], zero[:, g] = qparams(src * keep[:, i1 + i:i1 + i + G], spec, W.dtype)
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            c = torch.where(keep[:, i1 + i], quantize(w, s, z, spec), z)  # [N]
            q = ((c - z) * s).to(W.dtype).float()  # what the kernel multiplies by
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            codes[:, i1 + i], Err1[:, i] = c, err
        W_[:, i2:] -= Err1 @ U[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return Quantized.from_grid(codes, scale, zero, spec, W.dtype)
