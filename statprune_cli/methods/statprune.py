"""statprune: magnitude pruning with statistical correction (arXiv 2602.07375, formulas ours).

Per input channel j: mean mu_j, second moment m2_j = E[x_j^2], variance s2_j = m2_j - mu_j^2,
mean absolute value a_j. Pruning row i leaves the error e_i = sum_{j pruned} W_ij x_j with
E[e_i] = sum_pruned W_ij mu_j and Var[e_i] ~ sum_pruned W_ij^2 s2_j. Hence:

score (which weights to drop)
  variance:    |W_ij| * sqrt(s2_j)        the error left once the mean is compensated
  tempered:    |W_ij| * m2_j^(alpha/2)    alpha = 1 is Wanda, alpha = 0 is magnitude
  first_order: |W_ij| * a_j
  magnitude:   |W_ij|                     (for the "compensation only" ablation)

compensation (after the mask, closed form, per output row i)
  mean:   b_i += sum_pruned W_ij mu_j, so E[y_i] is unchanged
  energy: kept W_ij *= gamma_i = (sum_j W_ij^2 v_j / sum_kept W_ij^2 v_j)^(beta/2), v = m2 or s2;
          with v = s2 the bias also absorbs the mean shift the scaling causes
  both:   energy, then the bias restores the dense mean exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from statprune_cli.errors import ConfigError
from statprune_cli.methods.base import Method, Options
from statprune_cli.stats import ChannelStats

SCORES = ("variance", "tempered", "first_order", "magnitude")
COMPENSATIONS = ("none", "mean", "energy", "both")


@dataclass
class StatPruneOptions(Options):
    score: str = "variance"
    alpha: float = 0.5
    compensation: str = "mean"
    beta: float = 1.0
    energy_stat: str = "m2"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError("pruning.options.score", f"expected one of {', '.join(SCORES)}, got {self.score!r}")
        if self.compensation not in COMPENSATIONS:
            raise ConfigError("pruning.options.compensation", f"expected one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        for key in ("alpha", "beta"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"pruning.options.{key}", f"expected a number in [0, 1], got {getattr(self, key)}")
        if self.energy_stat not in ("m2", "s2"):
            raise ConfigError("pruning.options.energy_stat", f"expected 'm2' or 's2', got {self.energy_stat!r}")


class StatPrune(Method):
    name = "statprune"
    Options = StatPruneOptions

    @property
    def wants_bias(self) -> bool:
        o = self.options
        return o.compensation in ("mean", "both") or (o.compensation == "energy" and o.energy_stat == "s2")

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        o = self.options
        act = {
            "variance": lambda: stats.var.sqrt(),
            "tempered": lambda: stats.m2.pow(o.alpha / 2),
            "first_order": lambda: stats.mean_abs,
            "magnitude": lambda: None,
        }[o.score]()
        if act is None:
            return weight.abs()
        return weight.abs() * act.to(weight.device, torch.float32)

    def update(self, linear: nn.Linear, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats | None) -> dict[str, Any]:
        assert stats is not None
        o = self.options
        w = weight.double()
        kept = w.masked_fill(mask, 0.0)
        new = kept
        info: dict[str, Any] = {}
        if o.compensation in ("energy", "both") and o.beta > 0:
            v = (stats.m2 if o.energy_stat == "m2" else stats.var).to(w.device)
            dense_energy = (w * w) @ v
            kept_energy = (kept * kept) @ v
            ratio = torch.where(kept_energy > 0, dense_energy / kept_energy.clamp_min(1e-300), torch.ones_like(kept_energy))
            gamma = ratio.pow(o.beta / 2)
            new = kept * gamma[:, None]
            info["gamma_mean"] = float(gamma.mean())
        linear.weight.data.copy_(new.to(linear.weight.dtype))
        if self.wants_bias:
            if linear.bias is None:
                info["mean_compensation"] = "skipped: this architecture cannot take a bias here"
            else:
                mu = stats.mean.to(w.device)
                reference = w @ mu if o.compensation in ("mean", "both") else kept @ mu
                shift = reference - new @ mu
                linear.bias.data.add_(shift.to(linear.bias.dtype))
                info["bias_shift_abs_mean"] = float(shift.abs().mean())
        return info
