"""`statprune sweep` on a tiny model: every cell, the files, equality with `prune`, and failing cells."""

import json
from pathlib import Path

import pytest
from conftest import write_config
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.config import load_config
from statprune_cli.methods import METHODS
from statprune_cli.errors import ConfigError
from statprune_cli.commands.sweep import run_sweep
from statprune_cli.sweep_grid import parse_method, plan_cells
from statprune_cli.ui import UI

runner = CliRunner()


@pytest.fixture
def cfg(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> Path:
    return write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")


def test_sweep_runs_every_cell_and_writes_table_and_plot(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["sweep", str(cfg), "--methods", "magnitude,wanda,sparsegpt,ria,statprune",
                              "--sparsities", "70%,2:4", "-o", str(out), "--json", "-q"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["settings"] == ["70%", "2:4"]
    assert len(result["cells"]) == 10 and not [c for c in result["cells"] if c["error"]]
    for c in result["cells"]:
        expected = 0.7 if c["setting"] == "70%" else 0.5
        assert c["sparsity"] == pytest.approx(expected, abs=0.02) and c["perplexity"][0] > 1
    assert json.loads((out / "sweep.json").read_text())["cells"] == result["cells"]
    shared = {(c["method"], c["setting"]) for c in result["cells"] if c["shared_dense_statistics"]}
    # statprune unstructured is calibrated on the dense activations; at N:M its residual order is chosen on them
    assert shared == {("statprune", "70%"), ("statprune", "2:4")}
    assert result["shared_dense_seconds"] > 0
    table = (out / "sweep.md").read_text().splitlines()
    assert table[2] == "| method | 70% | 2:4 |" and len(table) == 4 + 5 + 2
    assert " s*)" in table[4 + 4] and table[-1].startswith("\\* used dense-model statistics")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sequential", [True, False])
def test_sweep_cell_equals_prune(cfg: Path, tmp_path: Path, sequential: bool) -> None:
    flag = f"pruning.sequential={str(sequential).lower()}"
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json", "--set", flag, "--set", "pruning.method=sparsegpt"])
    assert res.exit_code == 0, res.output
    ppl = json.loads(res.stdout)["perplexity"][0]["perplexity"]
    res = runner.invoke(app, ["sweep", str(cfg), "--methods", "wanda,sparsegpt", "--sparsities", "0.5", "-o",
                              str(tmp_path / "sw"), "-q", "--json", "--set", flag])
    assert res.exit_code == 0, res.output
    cells = {c["method"]: c for c in json.loads(res.stdout)["cells"]}
    assert cells["sparsegpt"]["perplexity"][0] == pytest.approx(ppl, rel=1e-5)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(cfg: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(self, linear, stats, target):
        raise RuntimeError("boom")

    monkeypatch.setattr(METHODS["ria"], "prune", broken)
    result = run_sweep(load_config(cfg), ["ria", "wanda"], ["0.5"], tmp_path / "sw", ui=UI(quiet=True))
    cells = {c["method"]: c for c in result["cells"]}
    assert cells["ria"]["error"] == "RuntimeError: boom" and not cells["ria"]["perplexity"]
    assert cells["wanda"]["error"] is None and cells["wanda"]["perplexity"]
    assert "failed: RuntimeError: boom" in (tmp_path / "sw" / "sweep.md").read_text()


def test_a_sweep_cut_short_keeps_its_finished_cells(cfg: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "sw"
    run_sweep(load_config(cfg), ["wanda"], ["0.5"], out, ui=UI(quiet=True))
    assert not (tmp_path / "sw.partial.json").exists()  # a finished sweep leaves only its folder

    def killed(self, linear, stats, target):  # a time limit's signal: not an error the sweep records
        raise KeyboardInterrupt

    monkeypatch.setattr(METHODS["ria"], "prune", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_config(cfg), ["wanda", "ria"], ["0.5"], tmp_path / "cut", ui=UI(quiet=True))
    assert not (tmp_path / "cut").exists()
    partial = json.loads((tmp_path / "cut.partial.json").read_text())
    cells = {c["method"]: c for c in partial["cells"]}
    assert cells["wanda"]["perplexity"] and cells["wanda"]["error"] is None and not cells["ria"]["perplexity"]


def test_method_suffixes_run_as_their_prune_runs_and_are_not_applicable_elsewhere(cfg: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["sweep", str(cfg), "--methods", "wanda+owl(m=3;lam=0.05),ria+realloc,wanda+alloc", "--sparsities",
                              "70%,2:4", "-o", str(tmp_path / "sw"), "-q", "--json"])
    assert res.exit_code == 0, res.output
    cells = {(c["method"], c["setting"]): c for c in json.loads(res.stdout)["cells"]}
    assert cells[("wanda+owl(m=3;lam=0.05)", "2:4")]["not_applicable"].startswith("pruning.profile: owl spreads")
    assert cells[("ria+realloc", "70%")]["not_applicable"].startswith("pruning.reallocation: channel reallocation")
    assert cells[("wanda+alloc", "2:4")]["not_applicable"].startswith("pruning.allocation: energy spreads")
    for (name, setting), flags in {("wanda+owl(m=3;lam=0.05)", "70%"): ["pruning.method=wanda", "pruning.sparsity=0.7",
                                                                         "pruning.profile=owl", "pruning.owl.m=3",
                                                                         "pruning.owl.lam=0.05"],
                                   ("ria+realloc", "2:4"): ["pruning.method=ria", "pruning.pattern=2:4",
                                                            "pruning.reallocation=true"],
                                   ("wanda+alloc", "70%"): ["pruning.method=wanda", "pruning.sparsity=0.7",
                                                            "pruning.allocation=energy"]}.items():
        run = runner.invoke(app, ["prune", str(cfg), "-q", "--json", "--overwrite", *(a for f in flags for a in ("--set", f))])
        assert run.exit_code == 0, run.output
        report = json.loads(run.stdout)
        assert cells[(name, setting)]["perplexity"][0] == pytest.approx(report["perplexity"][0]["perplexity"], rel=1e-5)
        assert cells[(name, setting)]["layer_target_sparsity"] == report["layer_target_sparsity"]
    assert len(set(cells[("wanda+owl(m=3;lam=0.05)", "70%")]["layer_target_sparsity"])) > 1
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| ria+realloc | n/a |" in table and "n/a: the method's suffix does not apply" in table


def test_realloc_suffixes_set_the_reallocation_key() -> None:
    assert parse_method("ria+realloc") == ("ria", {"method": "ria", "reallocation": True})
    assert parse_method("wanda+realloc(absorbed)") == ("wanda", {"method": "wanda", "reallocation": "absorbed"})
    assert parse_method("statprune+realloc(off)") == ("statprune", {"method": "statprune", "reallocation": False})
    assert parse_method("wanda+realloc+lsa") == ("wanda", {"method": "wanda", "reallocation": True, "lsa": True})
    assert parse_method("statprune+lsa(off)") == ("statprune", {"method": "statprune", "lsa": False})
    assert parse_method("sparsegpt+resperm+lsa") == ("sparsegpt", {"method": "sparsegpt", "residual_permutation": True,
                                                                   "lsa": True})
    assert parse_method("statprune+resperm(off)") == ("statprune", {"method": "statprune", "residual_permutation": False})
    assert parse_method("wanda+alloc") == ("wanda", {"method": "wanda", "allocation": "energy"})
    assert parse_method("statprune+alloc(off)") == ("statprune", {"method": "statprune", "allocation": "uniform"})
    assert parse_method("statprune+onepass") == ("statprune", {"method": "statprune", "sequential": False})
    assert parse_method("statprune+onepass(off)") == ("statprune", {"method": "statprune", "sequential": True})
    assert parse_method("statprune+sketch(off)") == ("statprune", {"method": "statprune", "options": {"sketch_rank": 0}})
    assert parse_method("statprune+paper") == ("statprune", {"method": "statprune", "options": {"preset": "paper"}})
    assert parse_method("statprune+sketch(every=4;rank=128)") == ("statprune", {"method": "statprune", "options": {
        "sketch_every": 4, "sketch_rank": 128}})
    with pytest.raises(ConfigError, match="unknown key 'stride' inside"):
        parse_method("statprune+sketch(stride=4)")
    with pytest.raises(ConfigError, match="expected key=value inside"):
        parse_method("statprune+sketch(4)")
    assert parse_method("magnitude+row+owl") == ("magnitude", {"method": "magnitude", "granularity": "row", "profile": "owl",
                                                               "owl": {}})
    assert parse_method("wanda+matrix") == ("wanda", {"method": "wanda", "granularity": "matrix"})


def test_the_sketch_suffix_sets_statprunes_sketch_whatever_the_configs_method(cfg: Path) -> None:
    cells = plan_cells(load_config(cfg), ["statprune+sketch", "statprune+sketch(off)"], ["2:4"])
    assert [c.cfg.pruning.options["sketch_rank"] for c in cells] == [512, 0]
    with pytest.raises(ConfigError, match="pruning.options"):  # the config's method is not statprune's: refused
        plan_cells(load_config(cfg), ["wanda+sketch"], ["2:4"])


@pytest.mark.parametrize("args,message", [
    (["--methods", "wanda,obs"], "--methods: unknown method 'obs'"),
    (["--methods", "wanda+prune"], "--methods: unknown suffix +prune in 'wanda+prune'; expected +owl"),
    (["--methods", "wanda+owl(m)"], "--methods: expected key=value inside +owl(...) of 'wanda+owl(m)', got 'm'"),
    (["--methods", "wanda+owl(mm=3)"], "pruning.owl.mm: unknown key"),
    (["--methods", "wanda+owl", "--sparsities", "2:4"], "pruning.profile: owl spreads an unstructured sparsity"),
    (["--sparsities", "0.5,lots"], "--sparsities: expected a sparsity such as 0.5"),
    (["--sparsities", "1.5"], "pruning.sparsity: expected a number in [0, 1)"),
    (["--sparsities", "5:4"], "pruning.pattern: expected N:M with 0 < N < M"),
])
def test_sweep_bad_input_is_one_line(cfg: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["sweep", str(cfg), "-o", str(tmp_path / "sw"), "-q", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_the_plot_does_not_join_unstructured_and_nm_points() -> None:
    from statprune_cli.sweep_grid import plot_segments

    cell = lambda m, s, p, e=None: {"method": m, "setting": s, "perplexity": [p], "error": e}  # noqa: E731
    result = {"methods": ["wanda", "ria"], "settings": ["0.5", "0.6", "2:4", "4:8"],
              "cells": [cell("wanda", "0.5", 10.0), cell("wanda", "0.6", 20.0), cell("wanda", "2:4", 30.0),
                        cell("wanda", "4:8", 25.0), cell("ria", "0.6", 21.0), cell("ria", "2:4", None, "boom")]}
    assert plot_segments(result) == [("wanda", [0, 1], [10.0, 20.0]), ("wanda", [2, 3], [30.0, 25.0]), ("ria", [1], [21.0])]


def test_a_one_setting_plot_has_a_bar_per_method_that_has_a_perplexity() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    from statprune_cli.sweep_grid import draw_plot

    cell = lambda m, p, e=None: {"method": m, "setting": "70%", "perplexity": [p], "error": e}  # noqa: E731
    result = {"model": "m", "datasets": ["wikitext2[test]"], "dense": [30.0], "methods": ["wanda", "ria", "statprune"],
              "settings": ["70%"], "cells": [cell("wanda", 1150.0), cell("ria", None, "boom"), cell("statprune", 535.6)]}
    fig = draw_plot(result, plt)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["wanda", "statprune"]
    assert [round(p.get_width(), 1) for p in ax.patches] == [1150.0, 535.6]
    assert [t.get_text() for t in ax.texts] == ["1,150", "536"]
    assert ax.get_xscale() == "log" and [list(line.get_xdata()) for line in ax.lines] == [[30.0, 30.0]]
    plt.close(fig)
