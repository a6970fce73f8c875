"""scripts/experimental.py: its methods run through the product's CLI and keep the product's guarantees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from experimental import EXPERIMENTAL  # noqa: E402

from conftest import prune_report  # noqa: E402
from statprune_cli.methods import METHODS  # noqa: E402


@pytest.mark.parametrize("method", sorted(EXPERIMENTAL))
@pytest.mark.parametrize("pruning", [{"pattern": "2:4"}, {"sparsity": 0.5, "options": {"sketch_rank": 16}}])
def test_experimental_methods_prune_through_the_cli(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch, pruning: dict, method: str) -> None:
    for name, cls in EXPERIMENTAL.items():
        monkeypatch.setitem(METHODS, name, cls)
    report = prune_report(tmp_path, tiny_model_dir, text_files, method=method, **pruning)
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    linears = {n: w for n, w in weights.items() if n.endswith("proj.weight")}
    if "pattern" in pruning:  # the N:M orders are absorbed: every stored weight is 2:4 as it stands
        assert all(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all() for w in linears.values())
    else:
        assert all(((w == 0).sum(1) == w.shape[1] // 2).all() for w in linears.values())
    assert report["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    (tmp_path / "plain").mkdir()
    plain = prune_report(tmp_path / "plain", tiny_model_dir, text_files, method="statprune", **pruning)
    assert plain["perplexity"][0]["perplexity"] != report["perplexity"][0]["perplexity"]


def test_runs_launch_experimental_methods_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/_runs.py's prune goes through scripts/experimental.py exactly when a cell names an experimental method."""
    import subprocess

    import _runs

    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="{}", stderr="")

    monkeypatch.setattr(_runs.subprocess, "run", fake_run)
    _runs.prune(["pruning.method=statprune-ls"], Path("unused"))
    _runs.prune(["pruning.method=statprune"], Path("unused"))
    assert seen[0][1].endswith("scripts/experimental.py") and seen[0][2] == "prune"
    assert seen[1][1:3] == ["-m", "statprune_cli"]
    assert "statprune-ls" not in METHODS  # routing leaves this process's registry the product's
