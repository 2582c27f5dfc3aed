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

from llmcompress.oneshot.hessian import inverse_cholesky, prepare_hessian, serial_on_cpu
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
    with serial_on_cpu(W.device):
        U = inverse_cholesky(H, percdamp)  # [K, K], in processing order
        masked, group_of = not bool(keep.all()), (perm // G).tolist()
        codesT = torch.zeros(K, N, device=W.device)  # processing order, row c = codes of column c
        for i1 in range(0, K, blocksize):
            i2 = min(i1 + blocksize, K)
            W1, U1 = W_[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
            ErrT = torch.zeros(i2 - i1, N, device=W.device)  # [B, N]: row i = column i's scaled error
            for i in range(i2 - i1):
                c, g = i1 + i, group_of[i1 + i]
                if not act_order and c % G == 0:  # first column of a group: its scales, from W as updated
                    src = W1[:, i:i + G] if G < K else W_
                    scale[:, g], zero[:, g] = qparams(src * keep[:, c:c + G], spec, W.dtype)
                s, z = scale[:, g], zero[:, g]
                w = W1[:, i]
                codesT[c] = quantize(w, s, z, spec)
                if masked:
                    codesT[c] = torch.where(keep[:, c], codesT[c], z)
                q = (codesT[c] - z).mul_(s).to(W.dtype).float()  # what the kernel multiplies by
                torch.sub(w, q, out=ErrT[i]).div_(U1[i, i])
                W1[:, i:].addr_(ErrT[i], U1[i, i:], alpha=-1)
            W_[:, i2:].addmm_(ErrT.T, U[i1:i2, i2:], alpha=-1)
    codes = codesT.T[:, torch.argsort(perm)]  # back to the original column order
    return Quantized.from_grid(codes, scale, zero, spec, W.dtype)
