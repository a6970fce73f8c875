"""Mask rules: which weights a score removes, for unstructured (per row or per matrix) and N:M patterns.

Masks are boolean with True = pruned, as in the Wanda and SparseGPT reference code.
"""

from __future__ import annotations

import torch


def unstructured_mask(score: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Prune the ``int(cols * sparsity)`` lowest scores of each row (or of the whole matrix)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if granularity == "row":
        k = int(score.shape[1] * sparsity)
        if k:
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    k = int(score.numel() * sparsity)
    if k:
        idx = torch.sort(score.flatten(), stable=True).indices[:k]
        mask.view(-1)[idx] = True
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive input channels of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern needs in_features divisible by M={m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def make_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, granularity: str) -> torch.Tensor:
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, granularity)
