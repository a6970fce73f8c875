"""ADMM with a gradual mask on the sketched input Hessian: how the full preset updates the kept weights at N:M.

Pruning a linear should keep its output: minimise ||(W - W') X||^2 over W' that is zero where pruned. ADMM
(Boza, "Fast and effective weight update for pruned large language models", 2024) splits it into a least-squares step
v = (W H + rho (z - dual)) (H + rho)^-1, a projection z = v + dual onto the sparsity pattern, and dual += v - z.
The pattern grows from dense to the target over the first ``RAMP`` steps on a cubic schedule, so the mask is chosen
along with the update: weights the update moved are judged where they ended up.

H = sum x x^T is known as its exact diagonal plus a rank-k sketch (sketch.py), H ~ D + U diag(lam) U^T, so
(H + rho)^-1 is one Woodbury solve shared by every row: two products of the weights with an in x k matrix per
step, never an in x in one. Everything runs where H has a unit diagonal (columns scaled by sqrt(diag H)): one
damping and one rho fit every linear, and |v| there is Wanda's score. This is second-order information, beyond the
paper (arXiv 2602.07375); the ``paper`` preset never runs it. Why these settings: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statprune_cli.masks import nm_mask, unstructured_mask
from statprune_cli.sketch import damped_diagonal

STEPS, RAMP = 20, 15  # Boza's schedule: the mask grows over the first 15 of 20 steps
DAMP = 0.1  # Boza's damping: a tenth of the unit diagonal
RHO = 1.0
SAMPLE_LOG2 = 18  # the growing N:M mask's threshold comes from about 2^18 sampled magnitudes


def gradual_mask(a: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """The weights to prune at ``sparsity`` (at most the target's) by their magnitudes ``a``: per row when
    unstructured; under N:M, among each group's n smallest, those below one threshold over the matrix, the k-th smallest
    of a strided sample (the count is approximate on the way, exact N:M at the target, where every candidate goes)."""
    if nm is None:
        return unstructured_mask(a, sparsity)
    cand = nm_mask(a, *nm)
    share = sparsity * nm[1] / nm[0]  # of the candidates
    if share >= 1.0 - 1e-9:
        return cand
    stride = max(1, a.numel() >> SAMPLE_LOG2)
    sample = a.view(-1)[::stride][cand.view(-1)[::stride]]
    k = int(sample.numel() * share)
    if k == 0:
        return torch.zeros_like(cand)
    return cand.logical_and_(a <= sample.kthvalue(k).values)


@dataclass(frozen=True)
class SketchSystem:
    """H ~ D + U diag(lam) U^T scaled to a unit diagonal and damped, with the Woodbury factors of (H + rho)^-1 =
    diag(1/a) - P diag(1 / (1 + sigma)) P^T, set up in float64 and kept in float32 for the products with weights."""

    norm: torch.Tensor  # sqrt(diag H): column j of the weights is scaled by norm[j]
    d: torch.Tensor  # the scaled, damped diagonal part
    u: torch.Tensor  # the scaled U
    lam: torch.Tensor
    inv_a: torch.Tensor  # 1 / (d + rho)
    p: torch.Tensor
    q_t: torch.Tensor  # (P / (1 + sigma))^T

    @classmethod
    def of(cls, diag: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, damp: float = DAMP, rho: float = RHO) -> SketchSystem:
        diag, u, lam = diag.double(), u.double(), lam.double()
        norm = diag.sqrt()
        norm = norm.clamp_min(1e-8 * float(norm.max()))  # a dead channel: its weights barely move
        un = u / norm[:, None]
        d = damped_diagonal(diag, u, lam, 0.0) / norm.square() + damp
        a = d + rho
        s = lam.sqrt()
        sigma, q = torch.linalg.eigh(s[:, None] * ((un.T / a) @ un) * s[None, :])
        p = (un / a[:, None]) @ (s[:, None] * q)
        q_t = (p / (1.0 + sigma)).T.contiguous()
        return cls(*(t.float() for t in (norm, d, un, lam, 1.0 / a, p, q_t)))

    def hmul(self, w: torch.Tensor) -> torch.Tensor:
        """w (H + damp), H scaled."""
        return torch.addmm(w * self.d, (w @ self.u).mul_(self.lam), self.u.T)

    def solve_(self, r: torch.Tensor) -> torch.Tensor:
        """r (H + damp + rho)^-1, in place in ``r``."""
        rp = r @ self.p
        return r.mul_(self.inv_a).addmm_(rp, self.q_t, alpha=-1.0)


def admm(weight: torch.Tensor, system: SketchSystem, sparsity: float, nm: tuple[int, int] | None,
         steps: tuple[int, int] = (STEPS, RAMP), rho: float = RHO) -> torch.Tensor:
    """The pruned ``weight`` (float32, a new tensor) after ``steps`` = (steps, ramp) of ADMM: the mask follows
    |v + dual| and grows to ``sparsity`` over the ramp, then stays. Four matrices of the weight's size at a time."""
    iters, ramp = steps
    v = weight.float() * system.norm
    xy = system.hmul(v)
    dual = torch.zeros_like(v)
    z = torch.empty_like(v)
    mask = torch.zeros_like(v, dtype=torch.bool)
    for t in range(iters):
        torch.add(v, dual, out=z)
        if t < ramp:
            mask = gradual_mask(z.abs(), sparsity * (1 - (1 - (t + 1) / ramp) ** 3), nm)
        z.masked_fill_(mask, 0.0)
        dual.add_(v).sub_(z)
        v = system.solve_(torch.sub(z, dual, out=v).mul_(rho).add_(xy))  # v's storage holds the right-hand side
    return v.add_(dual).masked_fill_(mask, 0.0).div_(system.norm)


def admm_update(weight: torch.Tensor, diag: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, sparsity: float,
                nm: tuple[int, int] | None, order: torch.Tensor | None = None,
                steps: tuple[int, int] = (STEPS, RAMP)) -> None:
    """Prune ``weight`` in place by ADMM on H ~ diag + U diag(lam) U^T; with ``order`` (reallocated N:M groups) the
    groups are taken over the input channels in that order."""
    cols = slice(None) if order is None else order.long().to(weight.device)
    system = SketchSystem.of(diag[cols], u[cols], lam)
    weight[:, cols] = admm(weight[:, cols], system, sparsity, nm, steps).to(weight.dtype)
