"""scripts/post_norm_probe.py, whose table in docs/methods.md says that a post-norm cancels energy compensation's
common scale: it must read the MLP's output where the residual stream receives it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from post_norm_probe import measure  # noqa: E402


@pytest.mark.parametrize("arch", ["gemma3", "olmo2"])
def test_behind_a_post_norm_the_output_keeps_its_norm_whatever_beta(arch: str) -> None:
    row = measure(arch, layer=1, windows=2, seqlen=32, seed=0)
    assert row["uniform x1.2"] < 1e-5
    assert row["norm, beta 0"] == pytest.approx(1.0, abs=1e-4) and row["norm, beta 1"] == pytest.approx(1.0, abs=1e-4)


def test_without_one_beta_restores_the_norm_pruning_took() -> None:
    row = measure("llama", layer=1, windows=2, seqlen=32, seed=0)
    assert row["uniform x1.2"] == pytest.approx(0.2, abs=1e-5)
    assert row["norm, beta 0"] < 0.95 and row["norm, beta 1"] == pytest.approx(1.0, abs=0.05)
