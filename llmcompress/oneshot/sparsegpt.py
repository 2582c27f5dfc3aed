"""SparseGPT (Frantar & Alistarh 2023): prune with OBS weight updates, column block by column block.

Columns are processed left to right. Pruning column i leaves an error err = w_i / [H^-1]_ii per row,
which the remaining columns absorb through row i of the inverse Hessian; updates to columns past the
current block are applied lazily, once per block. The mask is chosen as the columns are reached
(adaptive mask selection): per block for a ratio, per group of m for n:m.
"""

from __future__ import annotations

import torch

from llmcompress.oneshot.hessian import inverse_cholesky, prepare_hessian, serial_on_cpu
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
    with serial_on_cpu(W.device):
        U = inverse_cholesky(H, percdamp)  # [K, K]
        keep = torch.ones(N, K, dtype=torch.bool, device=W.device)
        for i1 in range(0, K, blocksize):
            i2 = min(i1 + blocksize, K)
            W1, U1 = W_[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
            d = U1.diagonal()  # [B]
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if not pattern.m:  # prune the block's lowest OBS saliencies w² / [H^-1]_jj²
                score = (W1 / d).pow(2).flatten()
                keep1.view(-1)[score.topk(int(score.numel() * pattern.sparsity), largest=False).indices] = False
            drop = (~keep1) / d  # [N, B]: err = w / d on pruned weights, 0 on kept ones
            ErrT = torch.zeros(i2 - i1, N, device=W.device)  # [B, N]: row i = column i's error
            for i in range(i2 - i1):
                if pattern.m and i % pattern.m == 0:
                    cols = slice(i, i + pattern.m)
                    score = (W1[:, cols] / d[cols]).pow(2)  # [N, m]
                    keep1[:, cols].scatter_(1, score.topk(pattern.m - pattern.n, dim=1, largest=False).indices, False)
                    drop[:, cols] = (~keep1[:, cols]) / d[cols]
                torch.mul(W1[:, i], drop[:, i], out=ErrT[i])
                W1[:, i:].addr_(ErrT[i], U1[i, i:], alpha=-1)  # column i becomes 0 where pruned, the rest absorb it
            W_[:, i1:i2], keep[:, i1:i2] = W1 * keep1, keep1
            W_[:, i2:].addmm_(ErrT.T, U[i1:i2, i2:], alpha=-1)
    return W_.to(W.dtype) * keep, keep
