"""statprune: magnitude pruning with statistical correction (arXiv 2602.07375; the formulas are ours).

Per input channel j the calibration gives the second moment m2_j = E[x_j^2]. Then, per linear:

score   |W_ij| * m2_j^(alpha/2)           alpha = 1 is Wanda's score, alpha = 0 magnitude
update  (preset ``full``, N:M only) mask and kept weights come from ADMM with a gradual mask (admm.py), which
        minimises ||(W - W') X||^2 under H = sum x x^T known as its exact diagonal plus a rank-``sketch_rank``
        Nystrom sketch (sketch.py): second-order information, beyond the paper
energy  kept W_ij *= gamma_i = (sum_j W_ij^2 m2_j / sum_kept W_ij^2 m2_j)^(beta/2), on the linears outside
        attention (``energy_targets``): the closed-form energy compensation

Two presets (``pruning.options.preset``):
- ``full`` (default): the settings that won on validation on two model families. Beyond the paper, all at N:M: the
  ADMM update on the sketch, N:M channel reallocation absorbed into the model, LSA-refined, the residual stream permuted for
  its readers' N:M groups (one extra dense pass). Unstructured, it is the paper's method.
- ``paper``: the paper's method as published: the calibrated score and the energy compensation, nothing else; no
  sketch or Gram matrix, no calibration pass beyond Wanda's.

Calibration, in both: unstructured, one pass per layer on the dense model's activations; N:M, Wanda's two passes per
layer (sequential). Every position of a window counts. Why each choice: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from statprune_cli.errors import ConfigError
from statprune_cli.layers import name_matches
from statprune_cli.methods.base import Method, Options, Target
from statprune_cli.admm import admm_update
from statprune_cli.sketch import nystrom, probe
from statprune_cli.stats import ChannelStats

SKETCH_RANK = 512  # the probes of the full preset's sketch at N:M (at most the input channels: stats.probed)
PRESETS = ("full", "paper")


@dataclass
class StatPruneOptions(Options):
    preset: str = "full"
    alpha: float = 1.0
    beta: float = 0.5  # half the energy back: between least squares (no scaling) and full restoration
    # the linears whose energy is restored; default: every one outside attention (no "att" in its name)
    energy_targets: list[str] = field(default_factory=lambda: ["re:(?!.*att)"])
    sketch_rank: int | None = None  # None: SKETCH_RANK at N:M under the full preset, else 0 (no update)
    sketch_every: int | None = None  # None: every 4th token, never fewer than 8,192 (sketch.auto_every)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError("pruning.options.preset", f"expected {' or '.join(PRESETS)}, got {self.preset!r}")
        if not 0.0 <= self.alpha <= 2.0:  # above 1 the activations weigh more than in Wanda
            raise ConfigError("pruning.options.alpha", f"expected a number in [0, 2], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("pruning.options.beta", f"expected a number in [0, 1], got {self.beta}")
        if self.sketch_rank is not None and self.sketch_rank < 0:
            raise ConfigError("pruning.options.sketch_rank", f"expected an integer >= 0, got {self.sketch_rank}")
        if self.sketch_every is not None and self.sketch_every < 1:
            raise ConfigError("pruning.options.sketch_every", f"expected an integer >= 1, got {self.sketch_every}")


class StatPrune(Method):
    name = "statprune"
    Options = StatPruneOptions

    def __init__(self, options: StatPruneOptions | None = None, nm: tuple[int, int] | None = None) -> None:
        o = options if options is not None else StatPruneOptions()
        full_nm = nm is not None and o.preset == "full"
        self.options = replace(o, sketch_rank=(SKETCH_RANK if full_nm else 0) if o.sketch_rank is None else o.sketch_rank)
        self.nm = nm
        self.full = o.preset == "full"

    @property
    def sequential(self) -> bool:
        return self.nm is not None

    @property
    def owl_m(self) -> float:
        return 7.0

    @property
    def reallocation(self) -> bool | str:
        return "absorbed" if self.full and self.nm else False

    @property
    def residual_permutation(self) -> bool:
        return self.full and self.nm is not None

    @property
    def lsa(self) -> bool:
        return self.full  # applies only where the run reallocates

    @property
    def sketch_rank(self) -> int:
        return self.options.sketch_rank

    @property
    def sketch_every(self) -> int | None:
        return self.options.sketch_every

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        act = stats.m2.pow(self.options.alpha / 2)
        return weight.abs().mul_(act.to(weight.device, torch.float32))  # in place: no second matrix-sized temporary

    def update(self, linear: nn.Linear, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats | None,
               target: Target, order: torch.Tensor | None = None) -> dict[str, float | int]:
        assert stats is not None
        o = self.options
        info: dict[str, float | int] = {}
        # One float64 matrix at a time (the squared weights), the rest in place in ``weight``: a 11008 x 4096 linear's
        # float64 copies are 360 MB each.
        energy = o.beta > 0 and any(name_matches(p, target.name) for p in o.energy_targets)
        if energy:
            v = stats.m2.to(weight.device)
            dense_energy = weight.double().square_() @ v
        info.update(self.reconstruct(weight, mask, stats, target, order))
        if energy:
            kept_energy = weight.double().square_() @ v
            ratio = torch.where(kept_energy > 0, dense_energy / kept_energy.clamp_min(1e-300), torch.ones_like(kept_energy))
            gamma = ratio.pow(o.beta / 2)
            info["gamma_mean"] = float(gamma.mean())
            weight.mul_(gamma.to(weight.dtype)[:, None])
        linear.weight.data.copy_(weight)  # a no-op for float32 weights: ``weight`` is their storage
        return info

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats, target: Target,
                    order: torch.Tensor | None) -> dict[str, float | int]:
        """Prune ``weight`` in place: zero it where ``mask`` says, or, where the options ask for a sketch, update it
        on the sketch (``sketch_update``)."""
        if not self.sketch_rank:
            weight.masked_fill_(mask, 0.0)
            return {}
        u, lam = sketch_factors(stats, self.sketch_rank, weight.device)
        self.sketch_update(weight, mask, stats.sumsq.to(weight.device), u, lam, target, order)
        return {"sketch_rank": self.sketch_rank}

    def sketch_update(self, weight: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, u: torch.Tensor,
                      lam: torch.Tensor, target: Target, order: torch.Tensor | None) -> None:
        """ADMM on H ~ diag + U diag(lam) U^T chooses the mask (``mask``'s rule grown gradually, over the N:M groups
        in ``order``) and moves the kept weights. The step an experimental update replaces (scripts/experimental.py)."""
        admm_update(weight, diag, u, lam, target.sparsity, target.nm, order)


def sketch_factors(stats: ChannelStats, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U and lam of the sketched input Hessian, from its ``k``-probe sketch and the probe it was made with, on
    ``device`` (default: the sketch's)."""
    y = stats.probed(k)
    assert y is not None  # the engine collects the sketch this method asks for (``sketch_rank``)
    device = y.device if device is None else device
    return nystrom(y.to(device), probe(y.shape[0], y.shape[1], device))
