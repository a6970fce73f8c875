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
and Woodbury's identity inverts H_KK = D_K + U_K lam U_K^T with one k x k system per row: rows x in x k^2 work.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SEED = 0  # one probe per width, the same in every process and run: sketches of one input merge by addition


@lru_cache(maxsize=8)  # every batch of every linear of a width asks for the same one
def probe(channels: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed Gaussian test matrix Omega (channels x k), float32, made on the CPU so every device gets the same.
    Shared: callers must not write to it."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(channels, k, generator=g, dtype=torch.float32).to(device)


def nystrom(y: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (channels x k, orthonormal) and lam (k) with H ~ U diag(lam) U^T from the sketch ``y`` = H ``omega``, by the
    stable single-pass Nystrom approximation (Tropp et al., 2017): the residual H - U lam U^T is positive semidefinite."""
    y, omega = y.double(), omega.double().to(y.device)
    nu = 1e-10 * float(y.norm())  # a shift that keeps the k x k core positive definite
    y = y + nu * omega
    core = omega.T @ y
    chol = torch.linalg.cholesky(0.5 * (core + core.T))
    b = torch.linalg.solve_triangular(chol, y.T, upper=False).T  # y chol^-T
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return u, (sigma.square() - nu).clamp_min(0.0)


def least_squares_update(weight: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, u: torch.Tensor,
                         lam: torch.Tensor, damp: float, rows_per_chunk: int = 1024) -> None:
    """Zero ``weight`` where ``mask`` is True and move its kept weights, in place, by each row's least-squares update
    under H ~ D + U diag(lam) U^T, with D = ``diag`` - diag(U lam U^T) + ``damp`` * mean(``diag``) (the damping
    SparseGPT adds to its Hessian: an update never leans on a direction the calibration tokens barely span)."""
    lam = lam.clamp_min(1e-12 * float(lam.max().clamp_min(1e-300)))
    d = (diag.double() - (u.square() * lam).sum(1)).clamp_min(0.0) + damp * float(diag.double().mean())
    k = lam.numel()
    outer = (u[:, :, None] * u[:, None, :]).reshape(u.shape[0], k * k)  # row j: u_j u_j^T, flattened
    inv_lam = torch.diag_embed(1.0 / lam)
    for w, m in zip(weight.split(rows_per_chunk), mask.split(rows_per_chunk)):
        keep = (~m).double()
        a = ((w.double() * m) @ u) * lam  # lam U_P^T w_P: H_KP w_P = U_K a
        g = ((keep / d) @ outer).view(-1, k, k)  # U_K^T D_K^-1 U_K
        t = a - torch.linalg.solve(inv_lam + g, (g @ a[:, :, None]))[:, :, 0]
        delta = (t @ u.T) / d * keep  # D_K^-1 U_K (a - (lam^-1 + G)^-1 G a)
        w.masked_fill_(m, 0.0).add_(delta.to(w.dtype))
