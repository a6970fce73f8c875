"""Mask rules: which weights a score removes, for unstructured (per row or per matrix) and N:M patterns.

Masks are boolean with True = pruned, as in the Wanda and SparseGPT reference code.
"""

from __future__ import annotations

import torch


CHUNK_ELEMENTS = 1 << 20  # rows are selected in chunks of about this many scores
NM_RANK_MAX_M = 8  # N:M masks of wider groups take topk: counting ranks costs m - 1 passes over the scores


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


def pruned_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a sparsity prunes: ``floor(n * sparsity)``, where a product that float rounding puts
    just below an integer counts as that integer (a sparsity of k / n gives k, e.g. 29 of 100 for 0.29)."""
    return int(n * sparsity + 1e-9)


def unstructured_mask(score: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Prune the ``pruned_count(cols, sparsity)`` lowest scores of each row (or of the whole matrix)."""
    if granularity == "row":
        return lowest_k(score, pruned_count(score.shape[1], sparsity))
    return lowest_k(score.reshape(1, -1), pruned_count(score.numel(), sparsity)).reshape(score.shape)


def check_groups(cols: int, m: int) -> None:
    """Groups of M consecutive input channels must tile the row (the config check names the linear first)."""
    if cols % m:
        raise ValueError(f"N:M pattern needs in_features divisible by M={m}, got {cols}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive input channels of each row, ties broken by column
    index as in ``lowest_k``.

    Up to m = 8 each entry's rank in its group is counted with m - 1 comparisons against the group's other
    columns, faster than ``topk`` on CPU (docs/experiments.md); the ADMM update recomputes the mask at every step.
    Wider groups take a stable sort (``topk`` breaks ties in no set order).
    """
    rows, cols = score.shape
    check_groups(cols, m)
    groups = score.reshape(rows, cols // m, m)
    mask = torch.empty_like(groups, dtype=torch.bool)
    if m > NM_RANK_MAX_M:
        lowest = groups.argsort(dim=-1, stable=True)[..., :n]
        return mask.zero_().scatter_(-1, lowest, True).reshape(rows, cols)
    columns = groups.unbind(-1)
    rank = torch.empty_like(columns[0], dtype=torch.uint8)
    for i, col in enumerate(columns):
        rank.zero_()
        for j, other in enumerate(columns):
            if j != i:  # an equal score in an earlier column ranks lower
                rank.add_(other <= col if j < i else other < col)
        torch.lt(rank, n, out=mask[..., i])
    return mask.reshape(rows, cols)


def nm_kept_score(score: torch.Tensor, n: int, m: int, order: torch.Tensor | None = None) -> float:
    """The score an N:M mask keeps, with the columns in ``order`` (default: as stored), a few MB of rows at a time:
    no mask and no permuted copy of the whole matrix."""
    step = max(1, CHUNK_ELEMENTS // score.shape[1])
    return sum(float((rows if order is None else rows[:, order]).unflatten(1, (-1, m))
                     .topk(m - n, dim=-1, sorted=False).values.sum(dtype=torch.float64)) for rows in score.split(step))


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


LSA_GROUPS = 256  # groups per assignment problem: cost grows as rows x groups^2, and larger blocks gain < 0.1% more


def refine_order(score: torch.Tensor, order: torch.Tensor, n: int, m: int, block: int = LSA_GROUPS) -> torch.Tensor:
    """RIA's linear-sum-assignment refinement of a reallocation order: for each position of the groups in turn, the
    channels at that position are exchanged between groups wherever that keeps more score (``exchange``). Groups
    are handled in consecutive blocks of ``block``. The current placement is one of the assignments considered, so
    no step lowers the kept score. Every row counts: summing the gains over a strided sample of the rows lost a third
    of the refinement's gain in kept score (1024 of SmolLM2's 1536 gate/up rows), blocks of 128 groups a twentieth."""
    groups = order.reshape(-1, m).clone()
    for start in range(0, groups.shape[0], block):
        part = groups[start:start + block]  # a view: positions are exchanged in place
        # each position's scores gathered once per block, (rows, groups) and contiguous: gathered from the full matrix
        # for every position's exchange (strided), a 4096 x 11008 down projection's refinement took 2x as long
        cols = list(score.index_select(1, part.T.reshape(-1)).unflatten(1, (m, -1)).permute(1, 0, 2).contiguous())
        for p in range(m):
            moved = exchange(cols, p, m - n)
            part[:, p] = part[moved, p]
            cols[p] = cols[p][:, moved]
    return groups.reshape(-1)


def kth_largest(values: list[torch.Tensor], k: int) -> torch.Tensor:
    """Elementwise k-th largest of a few same-shaped tensors, each inserted into a running sorted top k by max/min:
    for an N:M group's M - 1 other channels 2x faster than ``topk`` over a last dimension that short."""
    top = [torch.full_like(values[0], float("-inf")) for _ in range(k)]
    for v in values:
        for i in range(k):
            top[i], v = torch.maximum(top[i], v), torch.minimum(top[i], v)
    return top[-1]


def exchange(cols: list[torch.Tensor], p: int, keep: int) -> torch.Tensor:
    """Where the channels at position ``p`` of G groups go so that the groups keep (their ``keep`` largest scores per
    row) the most score in all, the other positions staying where they are: group h takes the position-``p`` channel
    of group ``moved[h]``. ``cols[q]`` (rows, G): the scores of the channels at position q of each group.

    In a row where a group's other channels have t as their ``keep``-th largest score, channel c adds
    max(0, score[c] - t) to what the group keeps without it; so placing c in group h keeps
    sum over rows of max(0, score[:, c] - t[:, h]) plus a term of h alone, which no assignment changes.
    scipy solves the assignment exactly (a Hungarian-type algorithm).
    """
    from scipy.optimize import linear_sum_assignment  # here, not at module import: only N:M runs that reallocate need it

    # (rows, G): what a channel must pass to be kept in each group
    t = kth_largest([x for q, x in enumerate(cols) if q != p], keep)
    c = cols[p]
    rows, size = c.shape
    # Rows per chunk of the (rows, G, G) gains: a chunk that stays in cache, summed in float32 (a few rows) and
    # accumulated in float64, is 25x faster than float64 sums over 16x larger chunks (4096 rows, G 256: 1.4 -> 0.06 s).
    step = max(1, CHUNK_ELEMENTS // (size * size))
    gain = sum((c[r:r + step, :, None] - t[r:r + step, None, :]).clamp_min_(0).sum(0).double()
               for r in range(0, rows, step))
    src, dst = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
    moved = torch.empty(size, dtype=torch.long, device=c.device)
    moved[torch.as_tensor(dst, device=c.device)] = torch.as_tensor(src, device=c.device)
    return moved


def make_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, granularity: str) -> torch.Tensor:
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, granularity)
