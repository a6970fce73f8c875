"""How a decoder layer's sparsity is spread over its linears: uniform, or by the share of output energy each loses.

Pruning the k lowest Wanda scores s_ij = |W_ij| * ||X_j||_2 of every row of a linear removes, in the
diagonal approximation of ||WX - W'X||^2, the output energy C(k) = sum over rows of the row's k smallest
s_ij^2. R(k) = C(k) / sum s^2 is the share of the linear's output energy it loses: scale-free, as a
Wanda row's comparison is, since each output feeds a norm, a nonlinearity or the residual at its own
scale. ``energy`` gives each linear the k (per row) that minimises the sum of R over the layer's linears
while pruning as many weights as uniform sparsity would, each linear within +-``spread`` of the layer's
sparsity: a greedy over columns by their loss per pruned weight (each R is convex, so a linear's columns
come in order; with equal row counts it is the exact optimum). The bound matters: unbounded, the small
value projections keep nearly every weight and perplexity is worse than uniform (README, Ablation).

Every method's statistics allow the Wanda score, so this composes with every method, and with OWL (the
layer's sparsity is OWL's). The curves are per row (Wanda's comparison) for every granularity.
"""

from __future__ import annotations

import torch
from torch import nn

from statprune_cli.masks import CHUNK_ELEMENTS, pruned_count
from statprune_cli.stats import ChannelStats

ALLOCATIONS = ("uniform", "energy")
SAMPLED_ELEMENTS = 2**21  # weights of a linear that measure its lost-energy curve (column_losses)


def column_losses(weight: torch.Tensor, stats: ChannelStats, elements: int = SAMPLED_ELEMENTS) -> torch.Tensor:
    """Share of the linear's output energy that its k-th pruned column of every row adds (k = 0, 1, ...): the
    k-th smallest s_ij^2 of each row, summed over rows, over the total; float64 on the CPU, non-decreasing.

    A linear of more than ``elements`` weights is measured on every ceil(out / rows)-th row, rows = as many as fill
    ``elements``. The sort is the allocation's whole cost: 2,048 rows of a 4096-wide model's linears
    cost 2.6 s per decoder layer on 2 CPU cores, 0.5 s at this bound (512 rows, 190 of the down projection).
    The curve is a mean over rows and the optimum is flat: on SmolLM2-135M at 50%, curves from 96-256 rows per
    linear gave allocations whose summed lost share was 0.6% above the whole-row optimum's (uniform: 17%
    above it; both figures from scripts/bench_allocation.py). SmolLM2's linears (at most 884,736 weights) are
    measured whole, as validated. Sorted a chunk of rows at a time, as ``masks.lowest_k`` selects: a sort of a
    whole large linear would hold its values and int64 indices at once, gigabytes on the device."""
    sums = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    rows = max(1, elements // weight.shape[1])
    sampled = weight.detach()[::-(-weight.shape[0] // rows)]
    for part in sampled.split(max(1, CHUNK_ELEMENTS // weight.shape[1])):
        sums += stats.wanda_score(part).square_().sort(dim=1).values.sum(0, dtype=torch.float64)
    sums = sums.cpu()
    return sums / sums.sum().clamp_min(torch.finfo(torch.float64).tiny)


def energy_sparsities(linears: dict[str, nn.Linear], stats: dict[str, ChannelStats], sparsity: float,
                      spread: float, elements: int = SAMPLED_ELEMENTS) -> dict[str, float]:
    """Each linear's sparsity (k / in_features) for layer sparsity ``sparsity``: the smallest sum of lost energy
    shares, pruning as many weights as uniform sparsity would (``masks.pruned_count`` per row of every linear;
    where the row counts cannot add up to that, fewer by less than one column of one linear), each linear
    within ``[sparsity - spread, sparsity + spread]``; each curve from ``elements`` weights (``column_losses``)."""
    values, sizes, owners = [], [], []
    budget = 0
    for index, (name, lin) in enumerate(linears.items()):
        rows, cols = lin.weight.shape
        budget += rows * pruned_count(cols, sparsity)
        loss = column_losses(lin.weight, stats[name], elements) / rows  # per pruned weight
        lo = pruned_count(cols, max(0.0, sparsity - spread))
        hi = pruned_count(cols, min(1.0, sparsity + spread))
        loss[:lo] = -1.0  # the lower bound's columns go first, whatever their loss
        values.append(loss[:hi])
        sizes.append(torch.full((hi,), rows, dtype=torch.int64))
        owners.append(torch.full((hi,), index, dtype=torch.int64))
    order = torch.cat(values).argsort(stable=True)
    size, owner = torch.cat(sizes)[order], torch.cat(owners)[order]
    first = int((size.cumsum(0) <= budget).sum())  # the columns taken in order until one does not fit
    counts = torch.bincount(owner[:first], minlength=len(linears))
    left = budget - int(size[:first].sum())
    for s, o in zip(size[first:].tolist(), owner[first:].tolist()):  # then any later column that still fits
        if s <= left:  # never a linear's column after one of its own that did not fit: their sizes are equal
            counts[o] += 1
            left -= s
    return {name: int(k) / lin.weight.shape[1] for (name, lin), k in zip(linears.items(), counts)}
