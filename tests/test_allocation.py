"""pruning.allocation: a layer's unstructured sparsity spread over its linears by the share of energy each loses."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import prune_report, write_config
from torch import nn
from typer.testing import CliRunner

from statprune_cli.allocation import column_losses, energy_sparsities
from statprune_cli.cli import app
from statprune_cli.masks import pruned_count, unstructured_mask
from statprune_cli.stats import ChannelStats

runner = CliRunner()


def layer(shapes: list[tuple[int, int]], seed: int = 0) -> tuple[dict[str, nn.Linear], dict[str, ChannelStats]]:
    """Linears whose weights are the more heavy-tailed the later they come, with inputs of unequal channel scales,
    each with its statistics: their lost-energy curves differ, so uniform sparsity is not the optimum."""
    g = torch.Generator().manual_seed(seed)
    linears, stats = {}, {}
    for i, (rows, cols) in enumerate(shapes):
        lin = nn.Linear(cols, rows, bias=False)
        lin.weight.data = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(3 * i)
        x = torch.randn(64, cols, generator=g) * torch.rand(cols, generator=g).mul(4).exp()
        linears[f"l{i}"], stats[f"l{i}"] = lin, ChannelStats.of(x)
    return linears, stats


def lost_share(lin: nn.Linear, st: ChannelStats, k: int) -> float:
    """The reference formula: the share of the Wanda energy (|W| ||X||)^2 in each row's k lowest scores."""
    energy = (lin.weight.detach().abs() * st.sumsq.sqrt().float()).double() ** 2
    return float(energy.sort(dim=1).values[:, :k].sum() / energy.sum())


def test_column_losses_are_the_lost_energy_shares() -> None:
    linears, stats = layer([(6, 10)])
    losses = column_losses(linears["l0"].weight, stats["l0"])
    assert bool((losses.diff() >= 0).all()) and float(losses.sum()) == pytest.approx(1.0)
    for k in (1, 4, 10):
        assert float(losses[:k].sum()) == pytest.approx(lost_share(linears["l0"], stats["l0"], k), rel=1e-5)


def test_column_losses_of_a_tall_linear_come_from_evenly_spaced_rows() -> None:
    linears, stats = layer([(10, 6), (10, 6)], seed=4)
    tall = linears["l1"]
    sampled = nn.Linear(6, 4, bias=False)
    sampled.weight.data = tall.weight.data[::3].clone()  # rows 0, 3, 6, 9: every ceil(10 / 4)-th
    losses = column_losses(tall.weight, stats["l1"], elements=24)  # as many rows as fill 24 weights: 24 / 6
    assert torch.allclose(losses, column_losses(sampled.weight, stats["l1"]))
    assert not torch.allclose(losses, column_losses(tall.weight, stats["l1"]))
    assert torch.equal(column_losses(tall.weight, stats["l1"], elements=29), losses)  # 29 weights fill 4 whole rows


def test_energy_allocation_is_the_optimum_when_rows_are_equal() -> None:
    """With equal row counts every column costs the same number of weights, and the greedy is exact: it must
    match the brute-force minimum of the summed lost shares over all allocations within the bounds."""
    linears, stats = layer([(5, 8), (5, 12), (5, 6)], seed=3)
    sparsity, spread = 0.5, 0.25
    chosen = energy_sparsities(linears, stats, sparsity, spread)
    ks = {n: pruned_count(lin.weight.shape[1], chosen[n]) for n, lin in linears.items()}
    budget = sum(pruned_count(lin.weight.shape[1], sparsity) for lin in linears.values())
    assert sum(ks.values()) == budget
    bounds = [range(pruned_count(c, sparsity - spread), pruned_count(c, sparsity + spread) + 1)
              for c in (lin.weight.shape[1] for lin in linears.values())]
    best = min(sum(lost_share(lin, stats[n], k) for (n, lin), k in zip(linears.items(), combo))
               for combo in itertools.product(*bounds) if sum(combo) == budget)
    got = sum(lost_share(lin, stats[n], ks[n]) for n, lin in linears.items())
    assert got == pytest.approx(best, rel=1e-9)
    assert got < sum(lost_share(lin, stats[n], pruned_count(lin.weight.shape[1], sparsity)) for n, lin in linears.items())


def test_energy_allocation_keeps_the_budget_and_the_bounds() -> None:
    linears, stats = layer([(24, 16), (8, 16), (40, 24), (16, 40)], seed=1)
    rows_apart = layer([(5, 16), (7, 16)], seed=1)  # no common divisor: short by less than a column where it must be
    short = energy_sparsities(*rows_apart, 0.5, 0.25)
    pruned = sum(lin.weight.shape[0] * pruned_count(16, short[n]) for n, lin in rows_apart[0].items())
    assert 12 * 8 - 7 < pruned <= 12 * 8
    for sparsity, spread in ((0.5, 0.1), (0.7, 0.2), (0.3, 0.05)):
        chosen = energy_sparsities(linears, stats, sparsity, spread)
        pruned = {n: lin.weight.shape[0] * pruned_count(lin.weight.shape[1], chosen[n]) for n, lin in linears.items()}
        uniform = sum(lin.weight.shape[0] * pruned_count(lin.weight.shape[1], sparsity) for lin in linears.values())
        assert sum(pruned.values()) == uniform  # the row counts have a common divisor, as in every transformer layer
        for n, lin in linears.items():
            cols = lin.weight.shape[1]
            assert pruned_count(cols, sparsity - spread) <= pruned_count(cols, chosen[n]) <= pruned_count(cols, sparsity + spread)
        assert len(set(chosen.values())) > 1


def test_energy_allocation_is_scale_free_and_spread_zero_is_uniform() -> None:
    """Shares of each linear's own energy: scaling one linear's weights changes nothing (a comparison of absolute
    energies would move sparsity to it)."""
    linears, stats = layer([(12, 16), (12, 24), (20, 16)], seed=2)
    before = energy_sparsities(linears, stats, 0.5, 0.2)
    linears["l1"].weight.data *= 1000.0
    assert energy_sparsities(linears, stats, 0.5, 0.2) == before
    assert energy_sparsities(linears, stats, 0.5, 0.0) == {n: 0.5 for n in linears}


def test_pruned_count_gives_k_back_for_k_over_n() -> None:
    assert 0.29 * 100 < 29 and pruned_count(100, 0.29) == 29
    assert all(pruned_count(n, k / n) == k for n in (7, 100, 576, 1536) for k in range(n + 1))
    assert int(unstructured_mask(torch.rand(3, 100), 0.29).sum()) == 3 * 29


def test_energy_allocation_through_the_cli(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    report = prune_report(tmp_path, tiny_model_dir, text_files, method="wanda", sparsity=0.6, allocation="energy",
                          allocation_spread=0.15, profile="owl", owl={"m": 2.0, "lam": 0.05})
    assert report["allocation"] == "energy"
    for row, layer_target in zip(report["layers"], report["layer_target_sparsity"]):
        assert row["target_sparsity"] == layer_target  # the layer's, which its linears share out unevenly
        linears = row["linears"].values()
        params = sum(r["shape"][0] * r["shape"][1] for r in linears)
        uniform = sum(r["shape"][0] * pruned_count(r["shape"][1], layer_target) for r in linears)
        zeros = sum(round(r["sparsity"] * r["shape"][0] * r["shape"][1]) for r in linears)
        assert zeros == uniform
        assert row["sparsity"] == pytest.approx(zeros / params)
        for r in linears:  # each linear's zeros are what its own target asks, per row
            assert r["sparsity"] == pytest.approx(pruned_count(r["shape"][1], r["target_sparsity"]) / r["shape"][1])
            cols = r["shape"][1]
            assert (pruned_count(cols, layer_target - 0.15) <= pruned_count(cols, r["target_sparsity"])
                    <= pruned_count(cols, layer_target + 0.15))
        assert len({r["target_sparsity"] for r in linears}) > 1


def test_terminal_report_shows_each_layers_owl_target_under_the_allocation(tmp_path: Path, tiny_model_dir: Path,
                                                                            text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       pruning={"method": "statprune", "sparsity": 0.6, "profile": "owl", "owl": {"m": 2.0, "lam": 0.05},
                                "allocation": "energy"})
    res = CliRunner().invoke(app, ["prune", str(cfg)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["allocation"] == "energy" and len(set(report["layer_target_sparsity"])) > 1
    assert "target" in res.output
    for target in report["layer_target_sparsity"]:
        assert f"{target:.1%}" in res.output


@pytest.mark.parametrize("method,pattern,setting,expected", [
    ("statprune", "unstructured", {}, "uniform"), ("statprune", "2:4", {}, "uniform"), ("wanda", "unstructured", {}, "uniform"),
    ("statprune", "unstructured", {"allocation": "energy"}, "energy"),
    ("sparsegpt", "unstructured", {"allocation": "energy"}, "energy")])
def test_allocation_is_the_methods_unless_set(method: str, pattern: str, setting: dict, expected: str, tmp_path: Path,
                                              tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    report = prune_report(tmp_path, tiny_model_dir, text_files, method=method, pattern=pattern, **setting)
    assert report["allocation"] == expected
    targets = {r["target_sparsity"] for row in report["layers"] for r in row["linears"].values()}
    assert (len(targets) > 1) == (expected == "energy")


@pytest.mark.parametrize("setting,message", [
    ({"allocation": "rows"}, "pruning.allocation: expected uniform or energy, got 'rows'"),
    ({"allocation": "energy", "pattern": "2:4"}, "pruning.allocation: energy spreads an unstructured sparsity"),
    ({"allocation_spread": 1.5}, "pruning.allocation_spread: expected a number in [0, 1), got 1.5"),
    ({"allocation": "energy", "method": "magnitude"}, "pruning.allocation: energy weighs each linear's Wanda scores")])
def test_allocation_config_errors(setting: dict, message: str, tmp_path: Path, tiny_model_dir: Path,
                                  text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out", pruning=setting)
    res = runner.invoke(app, ["prune", str(cfg), "-q"])
    assert res.exit_code == 2 and message in res.stderr
