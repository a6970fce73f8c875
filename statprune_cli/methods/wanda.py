"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from statprune_cli.methods.base import Method
from statprune_cli.stats import ChannelStats


class Wanda(Method):
    name = "wanda"

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        return stats.wanda_score(weight)
