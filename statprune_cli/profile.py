"""How the sparsity is spread over the decoder layers: uniform, or OWL (Yin et al., ICML 2024).

OWL: layers whose Wanda scores |W_ij| * ||X_j||_2 hold more outliers (scores above M times the
layer's mean) matter more, so they keep more weights. With D_l the outlier share of layer l,
rescaled to [0, 2 lambda], layer l gets sparsity target - (D'_l - mean D'), whose mean over the
layers is the target exactly. The scores come from dense-model statistics (one calibration pass
before pruning, or a ``--stats`` file), as in the OWL reference code.
"""

from __future__ import annotations

import torch
from torch import nn

from statprune_cli.errors import PruneError
from statprune_cli.stats import ChannelStats


def outlier_ratio(linears: dict[str, nn.Linear], stats: dict[str, ChannelStats], m: float) -> float:
    """Share of a layer's Wanda scores (all its target linears together) above ``m`` times their mean."""
    scores = []
    for name, lin in linears.items():
        if name not in stats:
            raise PruneError(f"no calibration statistics for {name}: the OWL profile needs every target linear's")
        scores.append(stats[name].wanda_score(lin.weight.detach()).flatten())
    flat = torch.cat(scores)
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsity from the outlier ratios: mean exactly ``target``, spread at most +-``lam``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if spread == 0:
        return [target] * len(ratios)
    scaled = (r - r.min()) / spread * (2 * lam)
    return (target - (scaled - scaled.mean())).tolist()
