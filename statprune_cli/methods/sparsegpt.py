"""SparseGPT (Frantar and Alistarh, 2023): prune column by column and let the kept weights absorb the error.

With H = 2/n X X^T the layer's input Hessian, removing weight q of a row costs w_q^2 / [H^-1]_qq and
the optimal update of the row's other weights is -w_q / [H^-1]_qq * H^-1[q, :] (Optimal Brain
Surgeon). SparseGPT processes the columns left to right in blocks: the mask of a block is chosen
up front from w^2 / [H^-1]_qq^2 (for N:M, every M columns from the already-updated weights), each
pruned column's error is spread over the block's later columns through the upper Cholesky factor
of H^-1, and the block's total error over all later columns in one matrix product.

With ``pruning.reallocation`` (N:M) the columns are taken in reallocation order (refined with ``pruning.lsa``),
ranked by Wanda's score (the reconstruction has no score of its own before it runs), and the result is put back in
the model's order.

Differences from the reference code, on purpose: the unstructured mask of a block prunes exactly
``int(sparsity * size)`` weights (the reference's ``<= threshold`` prunes one more), and
``granularity: row`` chooses within each row of the block instead of over the whole block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from statprune_cli.errors import ConfigError, PruneError
from statprune_cli.masks import nm_mask, unstructured_mask
from statprune_cli.methods.base import Method, Options, Outcome, Target
from statprune_cli.stats import ChannelStats


@dataclass
class SparseGPTOptions(Options):
    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.percdamp <= 1.0:
            raise ConfigError("pruning.options.percdamp", f"expected a number in [0, 1], got {self.percdamp}")
        if self.blocksize < 1:
            raise ConfigError("pruning.options.blocksize", f"expected an integer >= 1, got {self.blocksize}")


def inverse_hessian_factor(gram: torch.Tensor, count: int, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1 with H = 2/n X X^T, and the mask of dead input channels.

    A channel that never fires has a zero row and column in H: its diagonal becomes 1 so H stays
    invertible, and its weights are set to zero by the caller (they never contribute).
    """
    h = gram.to(torch.float32) * (2.0 / max(count, 1))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(hinv, upper=True), dead
    except torch.linalg.LinAlgError:
        raise PruneError("the input Hessian is not positive definite even after dampening; raise "
                         "pruning.options.percdamp or use more calibration windows") from None


def sparsegpt_prune(weight: torch.Tensor, hinv: torch.Tensor, target: Target, blocksize: int) -> torch.Tensor:
    """The pruned and updated ``weight`` (float32, modified in place and returned); ``hinv`` from above."""
    rows, cols = weight.shape
    n, m = target.nm if target.nm else (0, 0)
    if m:  # N:M groups must not straddle two blocks
        blocksize = max(m, blocksize - blocksize % m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w = weight[:, i1:i2].clone()
        h = hinv[i1:i2, i1:i2]
        d = torch.diag(h)
        err = torch.zeros_like(w)
        if m:
            mask = torch.zeros_like(w, dtype=torch.bool)
        else:
            mask = unstructured_mask(w**2 / d**2, target.sparsity, "row" if target.granularity == "row" else "matrix")
        for i in range(i2 - i1):
            if m and i % m == 0:
                mask[:, i:i + m] = nm_mask(w[:, i:i + m] ** 2 / d[i:i + m] ** 2, n, m)
            q = w[:, i].masked_fill(mask[:, i], 0.0)
            e = (w[:, i] - q) / d[i]
            w[:, i:].sub_(e.unsqueeze(1) * h[i, i:].unsqueeze(0))
            w[:, i] = q
            err[:, i] = e
        weight[:, i1:i2] = w
        weight[:, i2:].sub_(err @ hinv[i1:i2, i2:])
    return weight


class SparseGPT(Method):
    name = "sparsegpt"
    needs_gram = True
    granularity = "matrix"  # the reference compares within each block of columns, over all rows
    Options = SparseGPTOptions

    def prune(self, linear: nn.Linear, stats: ChannelStats | None, target: Target) -> Outcome:
        if stats is None or stats.gram is None:
            raise PruneError("sparsegpt needs the input Hessian; statistics files from `statprune calibrate` carry it "
                             "only when the config's pruning.method is sparsegpt")
        weight = linear.weight.data.float().clone()
        order = None
        if target.reallocation:
            order = target.channel_order(stats.wanda_score(weight))
            weight, stats = weight[:, order], stats.permuted(order)
        hinv, dead = inverse_hessian_factor(stats.gram.to(weight.device), stats.count, self.options.percdamp)
        weight[:, dead] = 0.0
        sparsegpt_prune(weight, hinv, target, self.options.blocksize)
        if order is not None:
            linear.weight.data[:, order] = weight.to(linear.weight.dtype)
        else:
            linear.weight.data.copy_(weight)
        return Outcome({"dead_channels": int(dead.sum())}, None if order is None else order.to(torch.int32))
