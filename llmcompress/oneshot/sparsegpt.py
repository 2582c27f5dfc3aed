"""SparseGPT (Frantar & Alistarh 2023): prune with OBS weight updates, column block by column block.

Columns are processed left to right. Pruning column i leaves an error err = w_i / [H^-1]_ii per row,
which the remaining columns absorb through row i of the inverse Hessian; updates to columns past the
current block are applied lazily, once per block. The mask is chosen as the columns are reached
(adaptive mask selection): per block for a ratio, per group of m for n:m.
"""

from __future__ import annotations

import torch

from llmcompress.oneshot.hessian import inverse_cholesky, prepare_hessian
from llmcompress.oneshot.magnitude import Pattern


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor, H: torch.Tensor, pattern: Pattern, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [N, K], H: [K, K] (2/n Σ x xᵀ of the layer's inputs) -> (pruned W in W's dtype, keep bool [N, K])."""
    N, K = W.shape
    if pattern.m and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} is not a multiple of m={pattern.m}; n:m groups must not straddle blocks")
    H, W_ = prepare_hessian(H, W)
    U = inverse_cholesky(H, percdamp)  # [K, K]
    keep = torch.ones(N, K, dtype=torch.bool, device=W.device)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, U1 = W_[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
        d = U1.diagonal()  # [B]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not pattern.m:  # prune the block's lowest OBS saliencies w² / [H^-1]_jj²
            score = (W1 / d).pow(2).flatten()
            keep1.view(-1)[score.topk(int(score.numel() * pattern.sparsity), largest=False).indices] = False
        for i in range(i2 - i1):
            if pattern.m and i % pattern.m == 0:
                score = (W1[:, i:i + pattern.m] / d[i:i + pattern.m]).pow(2)  # [N, m]
                drop = score.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                keep1[:, i:i + pattern.m].scatter_(1, drop, False)
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / d[i]  # [N]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q1[:, i], Err1[:, i] = q, err
        W_[:, i1:i2], keep[:, i1:i2] = Q1, keep1
        W_[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W_.to(W.dtype) * keep, keep
