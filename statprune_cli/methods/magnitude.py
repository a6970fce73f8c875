"""Magnitude pruning: score |W_ij|, no calibration data.

Unstructured, the lowest |W_ij| of the whole matrix go (one threshold per matrix), as the Wanda, SparseGPT and OWL
papers' magnitude baseline prunes, so that the baseline's figures compare with theirs. ``pruning.granularity: row``
compares within each row instead: on SmolLM2-135M that is the stronger baseline (docs/results.md).
"""

from __future__ import annotations

import torch

from statprune_cli.methods.base import Method
from statprune_cli.stats import ChannelStats


class Magnitude(Method):
    name = "magnitude"
    needs_calibration = False
    granularity = "matrix"

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        return weight.abs()
