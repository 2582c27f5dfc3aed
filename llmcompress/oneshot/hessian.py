"""The damped inverse Hessian that the OBS solvers (SparseGPT, GPTQ) share."""

from __future__ import annotations

import torch


def prepare_hessian(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of H: [K, K] and W: [N, K] in fp32, with dead inputs (never nonzero: H[j, j] == 0) made
    harmless: H[j, j] = 1 and W[:, j] = 0 (the weight multiplies only zeros)."""
    H, W = H.float().clone(), W.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return H, W


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)^-1 = Uᵀ U, λ = percdamp * mean(diag H). -> [K, K]

    U[i, i:] is row i of the inverse Hessian of the columns not yet processed (in OBS column order),
    divided by sqrt of its diagonal: the row that spreads column i's error over the later columns.
    When H is too ill-conditioned, λ grows tenfold, at most three times.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp * H.diagonal().mean()
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        damp = damp * 10
    raise ValueError(
        "the input Hessian is not positive definite even with 1000x damping; use more calibration "
        "samples or a larger percdamp"
    )
