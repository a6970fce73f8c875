"""ADMM on the sketched H (admm.py): its system against the matrix it stands for, its mask, and its optimum."""

from __future__ import annotations

import pytest
import torch

from statprune_cli.admm import SketchSystem, admm, admm_update, gradual_mask
from statprune_cli.sketch import nystrom, probe


def gram(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    return x.T @ x


def exact_system(h: torch.Tensor) -> SketchSystem:
    """The system of a sketch with as many probes as channels: H itself."""
    k = h.shape[0]
    u, lam = nystrom(h @ probe(k, k).double(), probe(k, k))
    return SketchSystem.of(h.diagonal(), u, lam)


def unit(h: torch.Tensor, damp: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    norm = h.diagonal().sqrt()
    return norm, h / norm[:, None] / norm[None, :] + damp * torch.eye(h.shape[0], dtype=h.dtype)


def test_the_system_multiplies_and_inverts_the_damped_unit_diagonal_h() -> None:
    h = gram(12)
    system = exact_system(h)
    norm, hn = unit(h)
    torch.testing.assert_close(system.norm.double(), norm, rtol=1e-6, atol=0)
    r = torch.randn(3, 12)
    torch.testing.assert_close(system.hmul(r).double(), r.double() @ hn, rtol=1e-4, atol=1e-4)
    want = r.double() @ torch.linalg.inv(hn + torch.eye(12, dtype=h.dtype))
    torch.testing.assert_close(system.solve_(r.clone()).double(), want, rtol=1e-4, atol=1e-5)


def test_gradual_mask_ends_exactly_n_m_and_grows_inside_the_groups_candidates() -> None:
    v = torch.randn(4, 16, generator=torch.Generator().manual_seed(3)).abs()
    final = gradual_mask(v, 0.5, (2, 4))
    assert torch.equal(final.reshape(4, 4, 4).sum(-1), torch.full((4, 4), 2))
    part = gradual_mask(v, 0.25, (2, 4))
    assert int(part.sum()) == 16 and not (part & ~final).any()  # half of the N:M candidates, the smallest
    assert float(v[part].max()) <= float(v[final & ~part].min())
    assert torch.equal(gradual_mask(v, 0.5, None).sum(1), torch.full((4,), 8))
    assert not gradual_mask(v, 0.01, (2, 4)).any()


def test_admm_reaches_the_least_squares_optimum_of_its_final_mask() -> None:
    """Once the mask is fixed ADMM solves a convex problem: enough steps give each row's exact damped least squares."""
    h, w = gram(12, 4), torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    got = admm(w, exact_system(h), 0.5, (2, 4), steps=(400, 15))
    mask = got == 0
    assert torch.equal(mask.reshape(5, 3, 4).sum(-1), torch.full((5, 3), 2))
    norm, hn = unit(h)
    wn, want = w.double() * norm, torch.zeros(5, 12, dtype=torch.float64)
    for r in range(5):
        k = (~mask[r]).nonzero()[:, 0]
        want[r, k] = torch.linalg.solve(hn[k][:, k], (hn @ wn[r])[k])
    torch.testing.assert_close(got.double() * norm, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_cuts_the_output_error_below_pruning_by_the_same_score(nm: tuple[int, int] | None) -> None:
    h, w = gram(16, 5), torch.randn(6, 16, generator=torch.Generator().manual_seed(5))

    def error(w2: torch.Tensor) -> float:
        d = (w - w2).double()
        return float(((d @ h) * d).sum())

    plain = w.masked_fill(gradual_mask(w * h.diagonal().sqrt().float(), 0.5, nm), 0.0)  # Wanda's mask, no update
    assert error(admm(w, exact_system(h), 0.5, nm)) < 0.8 * error(plain)


def test_the_update_over_an_order_is_admm_on_the_reordered_columns() -> None:
    h, w = gram(16, 6), torch.randn(6, 16, generator=torch.Generator().manual_seed(6))
    u, lam = nystrom(h @ probe(16, 8).double(), probe(16, 8))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    got = w.clone()
    admm_update(got, h.diagonal(), u, lam, 0.5, (2, 4), order.to(torch.int32))
    want = admm(w[:, order], SketchSystem.of(h.diagonal()[order], u[order], lam), 0.5, (2, 4))
    assert torch.equal(got[:, order], want)
    assert torch.equal((got[:, order] == 0).reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))  # N:M in that order
