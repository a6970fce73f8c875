"""scripts/recon_gap.py's block OBS, against brute force: the README's account of SparseGPT's lead rests on it."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from recon_gap import (admm_full, admm_sketch, block_diagonal, block_obs, error, exact_update,  # noqa: E402
                       row_scale_error, sketched_update, sparsegpt_weights)

from statprune_cli.methods.base import Target  # noqa: E402
from statprune_cli.methods.sparsegpt import inverse_hessian_factor  # noqa: E402


def correlated(cols: int) -> torch.Tensor:
    x = torch.randn(300, cols, dtype=torch.float64) @ torch.randn(cols, cols, dtype=torch.float64)
    return x.T @ x


@pytest.mark.parametrize("n,m", [(2, 4), (1, 3)])
def test_block_obs_is_the_best_mask_and_update_of_each_group_given_its_block(n: int, m: int) -> None:
    torch.manual_seed(0)
    rows, cols = 4, 3 * m
    h, w = correlated(cols), torch.randn(rows, cols)
    got = block_obs(w, h, n, m)
    assert torch.equal((got == 0).reshape(rows, -1, m).sum(-1), torch.full((rows, cols // m), n))
    block = torch.block_diag(*[h[g:g + m, g:g + m] for g in range(0, cols, m)])
    best = torch.zeros(rows, dtype=torch.float64)
    for r, g in itertools.product(range(rows), range(0, cols, m)):  # every mask, kept weights by least squares
        hb, wg = block[g:g + m, g:g + m], w[r, g:g + m].double()
        errors = []
        for pruned in itertools.combinations(range(m), n):
            kept = [i for i in range(m) if i not in pruned]
            v = torch.zeros(m, dtype=torch.float64)
            v[kept] = torch.linalg.solve(hb[kept][:, kept], hb[kept] @ wg)
            errors.append(float((wg - v) @ hb @ (wg - v)))
        best[r] += min(errors)
    torch.testing.assert_close(error(w, got, block), best, rtol=1e-5, atol=1e-8)


def test_row_scale_error_is_the_least_squares_residual() -> None:
    torch.manual_seed(1)
    x = torch.randn(500, 6, dtype=torch.float64) + 2.0  # non-zero means: the intercept has something to take
    h, mu, n = x.T @ x, x.mean(0), x.shape[0]
    w, w2 = torch.randn(3, 6), torch.randn(3, 6)
    y, y2 = x @ w.double().T, x @ w2.double().T
    ones = torch.ones(n, 1, dtype=torch.float64)

    def residual(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((b - a @ torch.linalg.lstsq(a, b).solution) ** 2).sum())

    scale = sum(residual(y2[:, i:i + 1], y[:, i:i + 1]) for i in range(3))
    both = sum(residual(torch.cat([y2[:, i:i + 1], ones], 1), y[:, i:i + 1]) for i in range(3))
    assert row_scale_error(w, w2, h, None, n) == pytest.approx(scale, rel=1e-6)
    assert row_scale_error(w, w2, h, mu, n) == pytest.approx(both, rel=1e-6)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_on_block_diagonal_h_keeps_each_block_to_itself(nm: tuple[int, int] | None) -> None:
    """With H's blocks and the sweep's the same, a block's result depends on its own weights only; with all of H,
    the error the first block leaves moves the later columns."""
    torch.manual_seed(2)
    h, w = correlated(16), torch.randn(5, 16)
    blocks = block_diagonal(h, 8)
    assert torch.equal(blocks[:8, 8:], torch.zeros(8, 8, dtype=h.dtype)) and torch.equal(blocks[8:, 8:], h[8:, 8:])
    target = Target(0.5, nm, "row")
    moved = w.clone()
    moved[:, :8] = torch.randn(5, 8)
    local, full = inverse_hessian_factor(blocks.float(), 300, 0.01), inverse_hessian_factor(h.float(), 300, 0.01)
    a, b = sparsegpt_weights(w, local, target, 8), sparsegpt_weights(moved, local, target, 8)
    assert torch.equal(a[:, 8:], b[:, 8:])
    assert not torch.equal(sparsegpt_weights(w, full, target, 8)[:, 8:], sparsegpt_weights(moved, full, target, 8)[:, 8:])


def test_the_exact_update_is_the_floor_that_the_sketched_ones_approach() -> None:
    torch.manual_seed(0)
    h, w = correlated(16), torch.randn(6, 16)
    mask = torch.rand(6, 16).argsort(1) < 8  # half of each row
    base = float(error(w, w.masked_fill(mask, 0.0), h).sum())
    exact = float(error(w, exact_update(w, mask, h), h).sum())
    full_sketch = float(error(w, sketched_update(w, mask, h, 16, True), h).sum())  # k = in: the sketch is exact
    shared = float(error(w, sketched_update(w, mask, h, 4, False), h).sum())
    assert exact == pytest.approx(full_sketch, rel=1e-6) and exact < shared < base


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_on_a_full_rank_sketch_is_admm_on_h(nm: tuple[int, int] | None) -> None:
    torch.manual_seed(5)
    h, w = correlated(16), torch.randn(6, 16)
    torch.testing.assert_close(admm_sketch(w, h, 16, 0.5, nm), admm_full(w, h, 0.5, nm), rtol=1e-3, atol=1e-4)
