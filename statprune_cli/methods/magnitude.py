"""Magnitude pruning: score |W_ij|, no calibration data.

Unstructured, the lowest |W_ij| of the whole matrix go (one threshold per matrix), as the Wanda, SparseGPT and OWL
papers' magnitude baseline prunes, so that the baseline's figures compare with theirs. ``pruning.granularity: row``
compares within each row instead: on SmolLM2-135M that is the stronger baseline (docs/results.md).

OWL's outlier threshold (unless ``pruning.owl.m`` is set): M 7, not the paper's 5, as for statprune. At 70% on
SmolLM2-135M (validation, calibration seeds 0-2) M 5 moved magnitude against uniform by -25.7, -22.5 and -12.9%, M 7 by
-69.5, -73.1 and -69.0%; on the test benchmark M 5 lost (+25.0, +42.2, +54.6%) where M 7 gained (README, OWL).
"""

from __future__ import annotations

import torch

from statprune_cli.methods.base import Method
from statprune_cli.stats import ChannelStats


class Magnitude(Method):
    name = "magnitude"
    needs_calibration = False
    granularity = "matrix"

    @property
    def owl_m(self) -> float:
        return 7.0  # measured: see the module's docstring

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        return weight.abs()
