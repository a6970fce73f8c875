"""A low-rank sketch of a linear's input second moments: what the ADMM update (admm.py) knows of their correlations.

Channel statistics give the diagonal of H = sum x x^T, which says which weights to drop but not how the kept
ones could take over: that needs H's off-diagonal part. The full H (SparseGPT's Hessian) costs tokens x in^2
to collect and in^3 to factor. Its large eigen-directions (the few channels with massive activations and the
shared mean direction of the tokens) hold most of what the kept weights can correct, and a Nystrom sketch finds
them from Y = H Omega = sum x (x^T Omega) for a fixed Gaussian Omega of ``k`` columns: tokens x in x k to
collect, a sum like every other statistic (it merges across batches and processes), then
H ~ D + U diag(lam) U^T with U, lam from Y and D the diagonal H keeps beyond them (exact, from sum x^2).

With that H, (H + c)^-1 is one Woodbury solve shared by every row of a weight: the ADMM update (admm.py) moves
the kept weights with two products of the weights with an in x k matrix per step, never an in x in one.
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
