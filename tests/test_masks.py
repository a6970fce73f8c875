import itertools

import pytest
import torch

from statprune_cli import masks
from statprune_cli.masks import exchange, nm_mask, reallocation_order, refine_order, unstructured_mask


def test_unstructured_row_prunes_exact_count_per_row() -> None:
    score = torch.rand(16, 40)
    mask = unstructured_mask(score, 0.5, "row")
    assert (mask.sum(1) == 20).all()
    # the pruned entries are the lowest scores of each row
    assert (score.masked_fill(~mask, -1).max(1).values <= score.masked_fill(mask, 2).min(1).values).all()


def test_unstructured_matrix_prunes_global_lowest() -> None:
    score = torch.rand(8, 10)
    mask = unstructured_mask(score, 0.3, "matrix")
    assert int(mask.sum()) == 24
    assert score[mask].max() <= score[~mask].min()


def test_zero_sparsity_prunes_nothing() -> None:
    assert not unstructured_mask(torch.rand(4, 8), 0.0).any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (8, 16)])
def test_nm_has_exact_zeros_per_group(n: int, m: int) -> None:
    score = torch.rand(12, 64)
    mask = nm_mask(score, n, m)
    groups = mask.reshape(12, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    s = score.reshape(12, 64 // m, m)
    assert (s.masked_fill(~groups, -1).amax(-1) <= s.masked_fill(groups, 2).amin(-1)).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 8), (8, 16)])
def test_nm_ties_go_by_column_like_a_stable_sort(n: int, m: int) -> None:
    score = torch.randint(0, 3, (16, 64)).float()  # many ties in every group
    order = score.reshape(16, -1, m).argsort(dim=-1, stable=True)[..., :n]
    expected = torch.zeros(16, 64 // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(16, 64)
    assert torch.equal(nm_mask(score, n, m), expected)


def test_nm_rejects_indivisible_columns() -> None:
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(2, 10), 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        reallocation_order(torch.rand(2, 10), 4)


@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_selection_equals_a_stable_sort_with_many_ties(granularity: str, sparsity: float) -> None:
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (12, 40), generator=g).float()  # few distinct values: ties at every threshold
    score[3] = 0.0  # a row of equal scores: the first columns go
    flat = score if granularity == "row" else score.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    expected = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(unstructured_mask(score, sparsity, granularity), expected.reshape(score.shape))


def test_count_zeros_equals_count_nonzero_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed zeros count, nan and inf do not, and the chunks neither lose nor double any."""
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 2)  # chunks of 4 x 2 elements, which do not divide 5 x 9
    t = torch.randn(5, 9)
    t[t < 0.3] = 0.0
    t[0, 0], t[1, 1], t[2, 2], t[3, 3] = -0.0, float("nan"), float("inf"), 0.0
    assert masks.count_zeros(t) == t.numel() - int(torch.count_nonzero(t)) == int((t == 0).sum())
    assert masks.count_zeros(t.to(torch.bfloat16)) == int((t == 0).sum())


def kept_score(score: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """What an N:M mask keeps of ``score`` with the input channels in ``order``."""
    s = score[:, order]
    return float(s[~nm_mask(s, n, m)].double().sum())


@pytest.mark.parametrize("n,m,p", [(2, 4, 0), (2, 4, 3), (1, 4, 1), (3, 4, 2), (1, 2, 1)])
def test_exchange_keeps_the_most_score_of_all_placements_of_one_position(n: int, m: int, p: int) -> None:
    """Against brute force over every placement of position p's channels (5 groups: 120), the others fixed."""
    torch.manual_seed(n * 10 + m + p)
    score = torch.rand(6, 5 * m) ** 3  # skewed, as activation-weighted scores are
    groups = torch.randperm(5 * m).reshape(5, m)
    best = 0.0
    for perm in itertools.permutations(range(5)):
        trial = groups.clone()
        trial[:, p] = groups[list(perm), p]
        best = max(best, kept_score(score, trial.reshape(-1), n, m))
    out = groups.clone()
    out[:, p] = groups[exchange([score[:, groups[:, q]] for q in range(m)], p, m - n), p]
    assert kept_score(score, out.reshape(-1), n, m) == pytest.approx(best, rel=1e-12)
    assert torch.equal(out[:, [q for q in range(m) if q != p]], groups[:, [q for q in range(m) if q != p]])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_refine_order_is_a_permutation_that_keeps_more_than_the_heuristic(n: int, m: int) -> None:
    torch.manual_seed(m)
    score = torch.rand(32, 64 * m) * torch.rand(64 * m) ** 4  # some channels far more important than others
    heuristic = reallocation_order(score, m)
    for block in (7, 256):  # blocks of groups: several, with a short last one; one for all
        order = refine_order(score, heuristic, n, m, block)
        assert torch.equal(order.sort().values, torch.arange(64 * m))
        assert kept_score(score, order, n, m) > kept_score(score, heuristic, n, m)
    # an order that is already refined has no exchange left that gains (each step keeps at least as much)
    again = refine_order(score, order, n, m)
    assert kept_score(score, again, n, m) >= kept_score(score, order, n, m) - 1e-9


@pytest.mark.parametrize("count,k", [(3, 2), (7, 4), (7, 1), (3, 3)])
def test_kth_largest_matches_topk(count: int, k: int) -> None:
    torch.manual_seed(count + k)
    values = [torch.randint(0, 4, (5, 6)).float() for _ in range(count)]  # many ties
    assert torch.equal(masks.kth_largest(values, k), torch.stack(values, -1).topk(k, -1).values[..., -1])
