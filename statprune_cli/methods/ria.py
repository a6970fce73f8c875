"""RIA, relative importance and activations (Zhang et al., ICLR 2024).

score_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2^a: a weight matters if it is
large relative to both its input channel (column) and its output row, scaled by a tempered
activation norm. Unstructured masks compare over the whole matrix, as the paper does; under OWL's layer
profile, within each row (``owl_granularity``), unless ``pruning.granularity`` says.

For N:M, ``pruning.reallocation: true`` gives the paper's channel reallocation (every method has it,
``Method.mask``): the N:M groups are taken over the input channels sorted and dealt out by score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statprune_cli.errors import ConfigError
from statprune_cli.methods.base import Method, Options
from statprune_cli.stats import ChannelStats


@dataclass
class RIAOptions(Options):
    a: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.a <= 2.0:
            raise ConfigError("pruning.options.a", f"expected a number in [0, 2], got {self.a}")


class RIA(Method):
    name = "ria"
    granularity = "matrix"
    # Under OWL's layer profile, per row: per matrix, an early layer's extra sparsity lands on the q/k rows it already
    # hit hardest, and OWL's effect changed sign with the calibration seed; per row it gained on every seed (README)
    owl_granularity = "row"
    Options = RIAOptions

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        w = weight.abs()
        relative = w / w.sum(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) + w / w.sum(1, keepdim=True).clamp_min(
            torch.finfo(w.dtype).tiny)
        return relative * stats.l2.to(weight.device, torch.float32).pow(self.options.a)
