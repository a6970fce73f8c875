"""The experimental registry: methods measured on validation that are not (yet, or no longer) part of the product's
schema.

``python scripts/experimental.py prune CONFIG ...`` is ``statprune prune`` with these methods registered beside the
product's; scripts/_runs.py launches it for any cell whose ``pruning.method`` names one of them. A method moves to
statprune_cli/methods/ only once it wins on the validation split of both benchmark models.

``statprune-ls``: the full preset's former N:M update, kept to reproduce the comparison that replaced it by ADMM
(docs/experiments.md): statprune's mask as chosen, then each row's kept weights K move by their least-squares update
delta_K = H_KK^-1 H_KP w_P under the sketched H ~ D + U diag(lam) U^T. D has no off-diagonal part, so
H_KP w_P = U_K lam (U_P^T w_P), and Woodbury's identity inverts H_KK = D_K + U_K lam U_K^T with one k x k system per
row (rows x in x k^2 work) or one shared by every row (rows x in x k; the method's; the per-row systems serve
scripts/recon_gap.py).

``statprune-admm10``: the full preset with 10 ADMM steps instead of 20, for the update's cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from statprune_cli.admm import admm_update  # noqa: E402
from statprune_cli.methods import METHODS  # noqa: E402
from statprune_cli.methods.base import Target  # noqa: E402
from statprune_cli.methods.statprune import StatPrune  # noqa: E402
from statprune_cli.sketch import damped_diagonal  # noqa: E402

SKETCH_DAMP = 0.01  # SparseGPT's percdamp: the least-squares update's H gets this share of its mean diagonal added


def least_squares_update(weight: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, u: torch.Tensor,
                         lam: torch.Tensor, damp: float, per_row: bool = False, rows_per_chunk: int = 1024) -> None:
    """Zero ``weight`` where ``mask`` is True and move its kept weights, in place, by each row's least-squares update
    under H ~ D + U diag(lam) U^T, with D = ``diag`` - diag(U lam U^T) + ``damp`` * mean(``diag``)
    (``damped_diagonal``).

    Per row, with z = U_P^T w_P and G = U_K^T D_K^-1 U_K: delta_K = D_K^-1 U_K (lam^-1 + G)^-1 z, solved as
    S (I + S G S)^-1 S z with S = lam^(1/2), a system whose eigenvalues are all >= 1. ``per_row``: each row's own G,
    rows x in x k^2 work (summed over the k (k + 1) / 2 distinct products u_a u_b). Otherwise G is taken as the
    row's kept share f of U^T D^-1 U, the same directions for every row, so one eigendecomposition of S U^T D^-1 U S
    solves every row and the work is two products of the weights with U (rows x in x k): the update can then afford a
    larger k. Products with the weights run in float32, the k x k algebra in float64."""
    d = damped_diagonal(diag, u, lam, damp)
    k = lam.numel()
    u32, inv_d = u.float(), (1.0 / d).float()
    s = lam.sqrt()
    if per_row:
        ia, ib = torch.triu_indices(k, k, device=u.device)
        pairs = u32[:, ia] * u32[:, ib]  # (in, k (k + 1) / 2)
        eye = torch.eye(k, dtype=torch.float64, device=u.device)
    else:
        sigma, q = torch.linalg.eigh(s[:, None] * ((u.T / d) @ u) * s[None, :])
        sq = s[:, None] * q  # S Q: t = S Q (I + f Sigma)^-1 Q^T S z
    for w, m in zip(weight.split(rows_per_chunk), mask.split(rows_per_chunk)):
        kept_over_d = (~m).float().mul_(inv_d)
        z = (w.float().masked_fill(~m, 0.0) @ u32).double()  # U_P^T w_P
        if per_row:
            packed = (kept_over_d @ pairs).double()  # (rows, pairs): the upper triangle of each row's G
            g = torch.zeros(w.shape[0], k, k, dtype=torch.float64, device=w.device)
            g[:, ia, ib] = packed
            g[:, ib, ia] = packed
            b = eye + s[:, None] * g * s[None, :]
            t = s * torch.cholesky_solve((s * z)[:, :, None], torch.linalg.cholesky(b))[:, :, 0]
        else:
            f = (~m).double().mean(1, keepdim=True)
            t = ((z @ sq) / (1.0 + f * sigma)) @ sq.T
        delta = (t.float() @ u32.T).mul_(kept_over_d)  # D_K^-1 U_K t
        w.masked_fill_(m, 0.0).add_(delta.to(w.dtype))


class StatPruneLs(StatPrune):
    """statprune with the sketched least-squares update of its kept weights in place of ADMM: the mask stays the one
    the score chose."""

    name = "statprune-ls"

    def sketch_update(self, weight: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, u: torch.Tensor,
                      lam: torch.Tensor, target: Target, order: torch.Tensor | None) -> None:
        least_squares_update(weight, mask, diag, u, lam, SKETCH_DAMP)


class StatPruneAdmm10(StatPrune):
    """statprune with half the ADMM steps (10, the mask grown over 7): half the update's cost for 0.3-2% more output
    error per linear on SmolLM2 (docs/experiments.md); measured end to end before it could become the default."""

    name = "statprune-admm10"

    def sketch_update(self, weight: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, u: torch.Tensor,
                      lam: torch.Tensor, target: Target, order: torch.Tensor | None) -> None:
        admm_update(weight, diag, u, lam, target.sparsity, target.nm, order, steps=(10, 7))


EXPERIMENTAL = {m.name: m for m in (StatPruneLs, StatPruneAdmm10)}


def register() -> None:
    """Add the experimental methods to the product's registry, for this process only."""
    METHODS.update(EXPERIMENTAL)


if __name__ == "__main__":
    register()
    from statprune_cli.cli import main

    main()
