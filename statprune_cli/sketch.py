"""A low-rank sketch of a linear's input second moments, and the least-squares update it allows after a mask.

Channel statistics give the diagonal of H = sum x x^T, which says which weights to drop but not how the kept
ones could take over: that needs H's off-diagonal part. The full H (SparseGPT's Hessian) costs tokens x in^2
to collect and in^3 to factor. Its large eigen-directions (the few channels with massive activations and the
shared mean direction of the tokens) hold most of what the kept weights can correct, and a Nystrom sketch finds
them from Y = H Omega = sum x (x^T Omega) for a fixed Gaussian Omega of ``k`` columns: tokens x in x k to
collect, a sum like every other statistic (it merges across batches and processes), then
H ~ D + U diag(lam) U^T with U, lam from Y and D the diagonal H keeps beyond them (exact, from sum x^2).

With that H, each row's best update of its kept weights K given its pruned ones P (minimise
||(W - W') X||^2) is delta_K = H_KK^-1 H_KP w_P. D has no off-diagonal part, so H_KP w_P = U_K lam (U_P^T w_P)
and Woodbury's identity inverts H_KK = D_K + U_K lam U_K^T with one k x k system per row (rows x in x k^2 work), or
with one system shared by every row (rows x in x k; ``least_squares_update``, statprune's; the per-row systems serve
scripts/recon_gap.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch

from statprune_cli.errors import PruneError

SEED = 0  # one probe per width, the same in every process and run: sketches of one input merge by addition
AUTO_EVERY, AUTO_TOKENS = 4, 8192  # the automatic stride: every 4th token, never fewer than 8,192 (auto_every)


def auto_every(tokens: int) -> int:
    """The token stride of the sketch when the config leaves it unset, for ``tokens`` calibration tokens in all: every
    4th token but never fewer than 8,192 of them, the two points measured (statprune's docstring: at 64 windows of 512
    tokens every 4th matched every token, every 16th, 2,048 tokens, lost 7%)."""
    return max(1, min(AUTO_EVERY, tokens // AUTO_TOKENS))


def resolve_every(every: int | None, batches: Iterable[torch.Tensor] | None) -> int:
    """``every`` as given, else ``auto_every`` of the batches' tokens: the engine and the dense statistics' cache key
    must resolve an unset stride alike, or a cached sketch would be filed under another stride than it was made with."""
    return every if every is not None else auto_every(sum(b.numel() for b in batches or []))


@lru_cache(maxsize=8)  # every batch of every linear of a width asks for the same one
def probe(channels: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed Gaussian test matrix Omega (channels x k), float32, made on the CPU so every device gets the same.
    Shared: callers must not write to it."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(channels, k, generator=g, dtype=torch.float32).to(device)


def nystrom(y: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (channels x k) and lam (k) with H ~ U diag(lam) U^T from the sketch ``y`` = H ``omega``, by the stable
    single-pass Nystrom approximation (Tropp et al., 2017): the residual H - U lam U^T is positive semidefinite.
    B = Y C^-T (C C^T = Omega^T Y) factors as U Sigma V^T; V and Sigma^2 come from the k x k matrix B^T B, 5x faster
    than an SVD of B at k = 256. Directions whose Sigma^2 is below 1e-10 of the largest are dropped (U's column and
    lam zero): B V / Sigma would only amplify rounding there."""
    omega = omega.double().to(y.device)
    # a shift that keeps the k x k core positive definite, at the rounding level of the sketch's dtype (Tropp et al.);
    # a rank-deficient H (fewer tokens than channels, dead channels) may need a larger one
    nu = torch.finfo(y.dtype).eps * float(y.double().norm())
    for _ in range(6):
        shifted = y.double() + nu * omega
        core = omega.T @ shifted
        chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
        if int(info) == 0:
            break
        nu *= 10.0
    else:
        raise PruneError("the input Hessian's sketch is not positive semidefinite: non-finite or corrupt statistics")
    y = shifted
    b = torch.linalg.solve_triangular(chol, y.T, upper=False).T  # y chol^-T
    sigma2, v = torch.linalg.eigh(b.T @ b)
    kept = sigma2 > 1e-10 * sigma2.max().clamp_min(1e-300)
    u = (b @ v) / sigma2.clamp_min(1e-300).sqrt() * kept
    return u, (sigma2 - nu).clamp_min(0.0) * kept


def damped_diagonal(diag: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, damp: float) -> torch.Tensor:
    """D of H ~ D + U diag(lam) U^T: what ``diag`` (H's exact diagonal) keeps beyond the sketch, plus ``damp`` times
    its mean (SparseGPT's damping: nothing leans on a direction the calibration tokens barely span), float64."""
    return (diag.double() - (u.square() * lam).sum(1)).clamp_min(0.0) + damp * float(diag.double().mean())


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
