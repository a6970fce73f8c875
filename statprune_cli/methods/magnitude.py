"""Magnitude pruning: score |W_ij|, no calibration data."""

from __future__ import annotations

import torch

from statprune_cli.methods.base import Method
from statprune_cli.stats import ChannelStats


class Magnitude(Method):
    name = "magnitude"
    needs_calibration = False

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        return weight.abs()
