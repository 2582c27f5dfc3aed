"""What the OBS solvers (SparseGPT, GPTQ) share: the damped inverse Hessian, and running their column
loops on one CPU thread."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the body on one intra-op thread when on CPU (then restore the setting).

    The column loops issue thousands of vector-sized ops; on CPU, intra-op threads only add
    synchronisation (a 1536 x 576 layer: 0.15 s on one thread, 5 s on two busy cores).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
