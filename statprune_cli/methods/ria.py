"""RIA, relative importance and activations (Zhang et al., ICLR 2024).

score_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2^a: a weight matters if it is
large relative to both its input channel (column) and its output row, scaled by a tempered
activation norm. Unstructured masks compare over the whole matrix, as the paper does.

Channel reallocation (N:M only, ``reallocation: true``): N:M forces every group of M consecutive
input channels to lose N weights per row, which hurts when several important channels sit in one
group. Sorting the channels by total score and dealing them out so that each group gets one
channel from each importance tier spreads them. The mask is chosen on the permuted columns and
mapped back, so the stored weights keep the model's function and are N:M once their columns are
put in that order: each linear's permutation is saved in the output's pruning_extras.safetensors
(``<linear>.channel_permutation``, int32), so a runtime with N:M kernels stores
``weight[:, perm]`` and gathers its input as ``x[..., perm]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from statprune_cli.errors import ConfigError
from statprune_cli.masks import nm_mask
from statprune_cli.methods.base import Method, Options, Target
from statprune_cli.stats import ChannelStats


@dataclass
class RIAOptions(Options):
    a: float = 0.5
    reallocation: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.a <= 2.0:
            raise ConfigError("pruning.options.a", f"expected a number in [0, 2], got {self.a}")


def reallocation_order(score: torch.Tensor, m: int) -> torch.Tensor:
    """A permutation of the input channels: position p holds channel ``order[p]``.

    Channels sorted by their summed score are cut into M tiers; group g takes the g-th channel of
    every tier (every other tier read backwards, so that group totals even out).
    """
    cols = score.shape[1]
    ranked = torch.argsort(score.sum(0), stable=True)
    tiers = ranked.reshape(m, cols // m).clone()
    tiers[1::2] = tiers[1::2].flip(-1)
    return tiers.T.reshape(-1)


class RIA(Method):
    name = "ria"
    granularity = "matrix"
    Options = RIAOptions

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        w = weight.abs()
        relative = w / w.sum(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) + w / w.sum(1, keepdim=True).clamp_min(
            torch.finfo(w.dtype).tiny)
        return relative * stats.l2.to(weight.device, torch.float32).pow(self.options.a)

    def mask(self, weight: torch.Tensor, score: torch.Tensor, stats: ChannelStats | None,
             target: Target) -> tuple[torch.Tensor, dict[str, Any]]:
        if not (self.options.reallocation and target.nm):
            return super().mask(weight, score, stats, target)
        order = reallocation_order(score, target.nm[1])
        mask = torch.empty_like(score, dtype=torch.bool)
        mask[:, order] = nm_mask(score[:, order], *target.nm)
        direct, _ = super().mask(weight, score, stats, target)
        return mask, {"reallocation_kept_score_gain": float(score[~mask].sum() / score[~direct].sum() - 1.0),
                      "channel_permutation": order.to(torch.int32)}
