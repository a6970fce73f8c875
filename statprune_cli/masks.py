"""Mask rules: which weights a score removes, for unstructured (per row or per matrix) and N:M patterns.

Masks are boolean with True = pruned, as in the Wanda and SparseGPT reference code.
"""

from __future__ import annotations

import torch


CHUNK_ELEMENTS = 1 << 20  # rows are selected in chunks of about this many scores


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores of each row, ties broken by column index (what a stable sort's first k are).

    Selecting (``kthvalue``) in chunks of rows keeps the temporary values and int64 indices to a few
    tens of MB; a full sort of the matrix would hold three times its size, gigabytes for one large linear.
    """
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return mask
    step = max(1, CHUNK_ELEMENTS // score.shape[1])
    for part, out in zip(score.split(step), mask.split(step)):
        kth = part.kthvalue(k, dim=1, keepdim=True).values
        below = part < kth
        need = k - below.sum(1, keepdim=True)  # how many of the entries equal to the kth value go, first by column
        tied = part == kth
        if bool((tied.sum(1, keepdim=True) > need).any()):
            tied &= tied.cumsum(1, dtype=torch.int32) <= need
        torch.logical_or(below, tied, out=out)
    return mask


def count_zeros(t: torch.Tensor) -> int:
    """Zeros in ``t``. ``count_nonzero`` branches on every float of a half-zero matrix (~5x slower on CPU than
    on a boolean copy); the copies are made a few MB at a time so they stay small next to any weight."""
    flat = t.detach().reshape(-1)
    return t.numel() - sum(int(torch.count_nonzero(part.bool())) for part in flat.split(4 * CHUNK_ELEMENTS))


def unstructured_mask(score: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Prune the ``int(cols * sparsity)`` lowest scores of each row (or of the whole matrix)."""
    if granularity == "row":
        return lowest_k(score, int(score.shape[1] * sparsity))
    return lowest_k(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(score.shape)


def check_groups(cols: int, m: int) -> None:
    """Groups of M consecutive input channels must tile the row (the config check names the linear first)."""
    if cols % m:
        raise ValueError(f"N:M pattern needs in_features divisible by M={m}, got {cols}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive input channels of each row."""
    rows, cols = score.shape
    check_groups(cols, m)
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def reallocation_order(score: torch.Tensor, m: int) -> torch.Tensor:
    """A permutation of the input channels for N:M (RIA's channel reallocation): position p holds channel ``order[p]``.

    N:M makes every group of M consecutive channels lose N weights per row, which hurts when several
    important channels sit in one group. Channels sorted by their summed score are cut into M tiers and
    group g takes the g-th channel of every tier (every other tier read backwards, so group totals even out).
    """
    cols = score.shape[1]
    check_groups(cols, m)
    ranked = torch.argsort(score.sum(0), stable=True)
    tiers = ranked.reshape(m, cols // m).clone()
    tiers[1::2] = tiers[1::2].flip(-1)
    return tiers.T.reshape(-1)


def make_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, granularity: str) -> torch.Tensor:
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, granularity)
