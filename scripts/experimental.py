"""The experimental registry: methods measured on validation that are not (yet) part of the product's schema.

``python scripts/experimental.py prune CONFIG ...`` is ``statprune prune`` with these methods registered beside the
product's; scripts/_runs.py launches it for any cell whose ``pruning.method`` names one of them. A method moves to
statprune_cli/methods/ only once it wins on the validation split of both benchmark models.

``statprune-admm``: statprune whose kept weights (and mask, within the N:M groups) come from ADMM with a gradual mask
(Boza, "Fast and effective weight update for pruned LLMs", 2024) run on the sketched input Hessian
H ~ D + U diag(lam) U^T instead of the whole H: every step's (H + c)^-1 is one Woodbury solve shared by every row,
two products of the weights with U (rows x in x k), so 20 steps cost about a forward pass over 40 k tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from statprune_cli.masks import nm_mask, unstructured_mask  # noqa: E402
from statprune_cli.methods import METHODS  # noqa: E402
from statprune_cli.methods.base import Outcome, Target  # noqa: E402
from statprune_cli.methods.statprune import StatPrune, StatPruneOptions, sketch_factors  # noqa: E402
from statprune_cli.sketch import damped_diagonal  # noqa: E402
from statprune_cli.stats import ChannelStats  # noqa: E402

Solve = Callable[[torch.Tensor], torch.Tensor]


def gradual_mask(v: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """The pruned weights at ``sparsity`` (at most the target's) by |v|: per row; under N:M only among each group's
    n smallest, those below a threshold over the whole matrix (the k-th smallest of an evenly strided sample of at
    most 2^18 candidates: the count is approximate on the way, exact N:M at the target)."""
    a = v.abs()
    if nm is None:
        return unstructured_mask(a, sparsity)
    cand = nm_mask(a, *nm)
    share = sparsity * nm[1] / nm[0]  # of the candidates
    if share >= 1.0:
        return cand
    vals = a[cand]
    sample = vals[:: max(1, vals.numel() >> 18)]
    k = int(sample.numel() * share)
    if k == 0:
        return torch.zeros_like(cand)
    return cand & (a <= sample.kthvalue(k).values)


def admm(w: torch.Tensor, norm: torch.Tensor, xy: torch.Tensor, solve: Solve, sparsity: float,
         nm: tuple[int, int] | None, steps: tuple[int, int] = (20, 15), rho: float = 1.0) -> torch.Tensor:
    """ADMM with a gradual mask in the space where H has a unit diagonal (``norm`` = sqrt(diag H)): weights ``w`` *
    norm, ``xy`` = their product with the damped H, ``solve(r)`` = r (H + damp + rho)^-1. The mask follows
    |w + dual| (Wanda's score there), growing to ``sparsity`` over ``steps[1]`` of the ``steps[0]`` steps on a cubic
    schedule, then fixed. Returns the pruned weight in the original scale, float32."""
    iters, ramp = steps
    v = w.to(xy.dtype) * norm
    dual = torch.zeros_like(v)
    for t in range(iters):
        if t < ramp:
            mask = gradual_mask(v + dual, sparsity * (1 - (1 - (t + 1) / ramp) ** 3), nm)
        z = (v + dual).masked_fill_(mask, 0.0)
        dual += v - z
        v = solve(xy + rho * (z - dual))
    return ((v + dual).masked_fill_(mask, 0.0) / norm).float()


def sketch_system(diag: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, damp: float, rho: float,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Solve]:
    """For H ~ D + U diag(lam) U^T with the exact diagonal ``diag``: sqrt(diag H), w -> w (H_n + damp) and
    r -> r (H_n + damp + rho)^-1, H_n the unit-diagonal H. The inverse by Woodbury with one k x k eigendecomposition
    shared by every row: (H_n + c)^-1 = diag(1/a) - P diag(1 / (1 + sigma)) P^T. Set up in float64; the products
    with the weights, each step's work, run in ``dtype``."""
    diag, u, lam = diag.double(), u.double(), lam.double()
    norm = diag.sqrt().clamp_min(1e-8 * float(diag.sqrt().max()))
    un = u / norm[:, None]
    d = damped_diagonal(diag, u, lam, 0.0) / norm.square() + damp  # D, normalised, with the unit-diagonal damping
    a = d + rho
    s = lam.sqrt()
    sigma, q = torch.linalg.eigh(s[:, None] * ((un.T / a) @ un) * s[None, :])
    p = (un / a[:, None]) @ (s[:, None] * q)
    norm, un, d, a, lam, sigma, p = (t.to(dtype) for t in (norm, un, d, a, lam, sigma, p))

    def hmul(w: torch.Tensor) -> torch.Tensor:
        return w * d + ((w @ un) * lam) @ un.T

    def solve(r: torch.Tensor) -> torch.Tensor:
        return r / a - ((r @ p) / (1.0 + sigma)) @ p.T

    return norm, hmul, solve


@dataclass
class AdmmOptions(StatPruneOptions):
    admm_damp: float = 0.1  # the published default: a tenth of the unit diagonal
    admm_rho: float = 1.0
    admm_steps: int = 20
    admm_ramp: int = 15


class StatPruneAdmm(StatPrune):
    """statprune (score, N:M orders, energy compensation) with ADMM on the sketch in place of its least-squares
    update; unstructured it needs ``pruning.options.sketch_rank`` set."""

    name = "statprune-admm"
    Options = AdmmOptions
    _order: torch.Tensor | None = None
    _target: Target | None = None

    def mask(self, weight: torch.Tensor, score: torch.Tensor, target: Target) -> tuple[torch.Tensor, Outcome]:
        mask, outcome = super().mask(weight, score, target)
        self._order, self._target = outcome.permutation, target  # the groups ADMM's mask must respect
        return mask, outcome

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats) -> dict[str, float | int]:
        if not self.sketch_rank:
            raise ValueError("statprune-admm needs a sketch: set pruning.options.sketch_rank")
        o, target = self.options, self._target
        u, lam = sketch_factors(stats, self.sketch_rank, weight.device)
        diag = stats.sumsq.to(weight.device)
        order = None if self._order is None else self._order.long().to(weight.device)
        if order is not None:
            weight_in, diag, u = weight[:, order], diag[order], u[order]
        else:
            weight_in = weight
        norm, hmul, solve = sketch_system(diag, u, lam, o.admm_damp, o.admm_rho)
        new = admm(weight_in, norm, hmul(weight_in.to(norm.dtype) * norm), solve, target.sparsity, target.nm,
                   (o.admm_steps, o.admm_ramp), o.admm_rho)
        if order is not None:
            weight[:, order] = new.to(weight.dtype)
        else:
            weight.copy_(new)
        return {"sketch_rank": self.sketch_rank, "admm_mask_changed": float((weight == 0).ne(mask).float().mean())}


EXPERIMENTAL = {m.name: m for m in (StatPruneAdmm,)}


def register() -> None:
    """Add the experimental methods to the product's registry, for this process only."""
    METHODS.update(EXPERIMENTAL)


if __name__ == "__main__":
    register()
    from statprune_cli.cli import main

    main()
