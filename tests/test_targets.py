"""scripts/targets.py, whose table says how far statprune is from its quality targets."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from targets import table  # noqa: E402


def row(method: str, setting: str, ppl: float, seed: int = 0, model: str = "") -> dict:
    key = f"{model}n64-s512-e65536" + (f"-seed{seed}" if seed else "")
    return {"key": key, "method": method, "setting": setting, "ppl": ppl}


def test_changes_are_paired_over_seeds_and_the_nm_bar_is_five_percent() -> None:
    rows = [row("statprune", "2:4", 96.0), row("sparsegpt", "2:4", 100.0),   # -4% at N:M: short of -5%
            row("statprune", "2:4", 90.0, 1), row("sparsegpt", "2:4", 100.0, 1),  # -10%
            row("statprune", "2:4", 50.0, 2),                                     # no SparseGPT cell: left out
            row("statprune", "4:8", 96.0), row("sparsegpt", "4:8", 100.0),
            row("statprune@abc1234", "50%", 1.0), row("statprune", "50%", 99.0), row("sparsegpt", "50%", 100.0),
            row("wanda", "50%", 90.0), row("ria", "50%", 120.0),
            row("statprune", "50%", 10.0, model="qwen-")]                         # another model's cell
    lines = table(rows, "smollm2", {0, 1, 2})
    by = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines if line.startswith("| ") and "%" in line}
    assert by["2:4"][1].strip() == "-7.0% (seeds 0,1) met"
    assert by["4:8"][1].strip() == "-4.0% (seeds 0) **not met**"   # N:M asks for 5% below SparseGPT
    assert by["50%"][0].strip() == "+10.0% (seeds 0) **not met**"   # the former default's cell is not the default
    assert by["50%"][1].strip() == "-1.0% (seeds 0) met"            # unstructured: at or below SparseGPT
    assert by["50%"][3].strip(" |") == "-17.5% (seeds 0) met"       # `paper` there is the default's method
    assert by["60%"] == [""] * 3 + [" |"]
