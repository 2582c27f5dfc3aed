"""ZipLM (Kurtic et al. 2023): structured second-order pruning of attention query groups and FFN channels.

Per linear layer the OBS problem is: remove a set S of input columns of W [N, K] (a structure) and update the
remaining columns so that the layer's output on the calibration inputs X changes least. With H = 2 X Xᵀ [K, K]
and Hinv = H⁻¹ (damped):
    error(S)  = tr( W[:, S] (Hinv[S, S])⁻¹ W[:, S]ᵀ )          squared output error of removing S
    δW        = -W[:, S] (Hinv[S, S])⁻¹ Hinv[S, :]                the optimal update of all columns
    Hinv     <- Hinv - Hinv[:, S] (Hinv[S, S])⁻¹ Hinv[S, :]       S eliminated from the problem
Structures are removed one at a time, always the one of least error, and the weights are snapshotted when the
number kept reaches each requested level: one pass gives every level of a layer (the database).

The structures of a Llama decoder layer:
- FFN channel j: column j of down_proj (updated by OBS) with row j of gate_proj and up_proj (dropped).
- Attention KV group g: the o_proj columns of its query heads (rep * head_dim columns, updated by OBS) with
  those heads' q_proj rows and KV head g's k_proj/v_proj rows (dropped). Removing a KV head removes its whole
  query group, so every kept block remains a valid GQA block (rep query heads per KV head).
All math here is pure: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Level:
    """A layer part pruned to `kept` structures: which ones (indices into the parent's) and the updated
    columns of the output projection for them. error: summed squared output error on the calibration set
    (2 Σ_t ||δy_t||², the OBS objective with H = 2 X Xᵀ / n scaled back by n)."""

    kept: torch.Tensor  # [kept] long, ascending
    weight: torch.Tensor  # [N, kept * width] updated output-projection columns of the kept structures
    error: float


def damped_inverse(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """(H + λI)⁻¹ with λ = percdamp * mean(diag H); dead inputs (diag 0) get diag 1 first. [K, K] -> [K, K]"""
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    damp = percdamp * H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            return torch.cholesky_inverse(L)
        damp = damp * 10
    raise ValueError("the input Hessian is not positive definite even with 1000x damping; use more calibration "
                     "tokens or a larger percdamp")


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A⁻¹ B for a batch of symmetric positive definite A: [m, w, w], B: [m, w, N] -> [m, w, N].

    Cholesky, with a per-matrix LU solve for the (numerically) indefinite ones. Not a batched LU solve:
    torch 2.13's MKL build hangs in it with more than one thread ("Parameter 6 was incorrect on entry to
    DLASWP"), which froze ZipLM databases built under --train-threads 2."""
    L, info = torch.linalg.cholesky_ex(A)
    out = torch.cholesky_solve(B, L)
    for i in (info != 0).nonzero().flatten().tolist():
        out[i] = torch.linalg.solve(A[i], B[i])
    return out


def structure_errors(W: torch.Tensor, Hinv: torch.Tensor, width: int, alive: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each structure (`width` consecutive columns) on its own; inf for removed ones.
    W: [N, K], Hinv: [K, K], alive: [K // width] bool -> [K // width]"""
    n, k = W.shape
    m = k // width
    if width == 1:
        err = W.pow(2).sum(0) / Hinv.diagonal()
    else:
        Wg = W.T.reshape(m, width, n)  # [m, w, N]
        blocks = Hinv.reshape(m, width, m, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [m, w, w]
        blocks = torch.where(alive[:, None, None], blocks, torch.eye(width, dtype=W.dtype, device=W.device))
        sol = spd_solve(blocks, Wg)  # [m, w, N]: Hinv_SS⁻¹ W_Sᵀ
        err = (Wg * sol).sum((1, 2))
    return torch.where(alive, err, torch.full_like(err, float("inf")))


def remove_structure(W: torch.Tensor, Hinv: torch.Tensor, idx: int, width: int) -> float:
    """Remove structure idx (columns idx*width ... +width) with the OBS update, IN PLACE on W [N, K] and
    Hinv [K, K] (the removed columns become 0 in W and a unit block in Hinv). -> error"""
    s = slice(idx * width, (idx + 1) * width)
    block = Hinv[s, s].clone()  # [w, w]
    if width == 1:
        d = float(block)
        ws = W[:, idx].clone()  # [N]
        row = Hinv[idx].clone()  # [K]
        err = float(ws @ ws) / d
        W.addr_(ws, row, alpha=-1 / d)
        Hinv.addr_(Hinv[:, idx].clone(), row, alpha=-1 / d)
    else:
        ws = W[:, s].clone()  # [N, w]
        rows = Hinv[s, :].clone()  # [w, K]
        coef = torch.linalg.solve(block, ws.T).T  # [N, w] = W_S Hinv_SS⁻¹
        err = float((coef * ws).sum())
        W.addmm_(coef, rows, alpha=-1)
        Hinv.addmm_(Hinv[:, s].clone(), torch.linalg.solve(block, rows), alpha=-1)
    W[:, s] = 0
    Hinv[s, :] = 0
    Hinv[:, s] = 0
    Hinv[s, s] = torch.eye(width, dtype=Hinv.dtype, device=Hinv.device)
    return err


def obs_levels(W: torch.Tensor, H: torch.Tensor, width: int, levels: list[int], n_tokens: int = 1,
               percdamp: float = 0.01, dtype: torch.dtype = torch.float32) -> dict[int, Level]:
    """Greedy structured OBS from all K // width structures down to min(levels), snapshotting each level.

    W: [N, K] output projection (down_proj or o_proj), H: [K, K] mean input Hessian 2/n Σ x xᵀ over n_tokens
    inputs. levels: numbers of structures to keep (0 = the part removed entirely). dtype: of the OBS updates
    (float32 as in SparseGPT; float64 for exactness tests). -> {kept: Level}
    """
    n, k = W.shape
    if k % width:
        raise ValueError(f"input width {k} is not a multiple of the structure width {width}")
    m = k // width
    bad = [lv for lv in levels if not 0 <= lv <= m]
    if bad:
        raise ValueError(f"levels {bad} are outside 0..{m} structures")
    Wd = W.to(dtype).clone()
    dead = H.diagonal() == 0
    Wd[:, dead] = 0
    Hinv = damped_inverse(H, percdamp).to(dtype)
    alive = torch.ones(m, dtype=torch.bool, device=W.device)
    out, total = {}, 0.0
    want = sorted(set(levels), reverse=True)

    def snapshot(kept_n: int) -> None:
        kept = alive.nonzero().flatten()
        cols = (kept[:, None] * width + torch.arange(width, device=W.device)).flatten()
        # the error is in units of the mean Hessian; scale by the token count for a summed error
        out[kept_n] = Level(kept=kept.cpu(), weight=Wd[:, cols].to(W.dtype).cpu(), error=total * n_tokens / 2)

    for kept_n in range(m, min(want) - 1, -1):
        if kept_n in want:
            snapshot(kept_n)
        if kept_n == min(want):
            break
        j = int(structure_errors(Wd, Hinv, width, alive).argmin())
        total += remove_structure(Wd, Hinv, j, width)
        alive[j] = False
    return out


def output_energy(W: torch.Tensor, H: torch.Tensor, n_tokens: int) -> float:
    """Σ_t ||W x_t||² over the calibration inputs from the mean Hessian H = 2/n Σ x xᵀ. W: [N, K], H: [K, K]"""
    return float(((W.double() @ H.double()) * W.double()).sum()) * n_tokens / 2


def activation_channel_scores(W_down: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """Minitron-style FFN channel importance: ||x_j|| * ||W_down[:, j]||. W_down: [D, I], sqnorm: [I] -> [I]"""
    return sqnorm.sqrt() * W_down.norm(dim=0)


def activation_group_scores(o_in_sqnorm: torch.Tensor, groups: int) -> torch.Tensor:
    """Importance of each KV group from the energy of its heads' attention outputs. [H * hd] -> [groups]"""
    return o_in_sqnorm.reshape(groups, -1).sum(1)


__all__ = ["Level", "activation_channel_scores", "activation_group_scores", "damped_inverse", "obs_levels",
           "output_energy", "remove_structure", "structure_errors"]
