"""scripts/sink_probe.py, whose figures in docs/methods.md explain why statistics keep a window's first position."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sink_probe import first_position_shares  # noqa: E402

from conftest import tiny_model  # noqa: E402


def test_one_position_windows_put_all_energy_at_position_0() -> None:
    model = tiny_model("llama").eval()
    shares, ratios = first_position_shares(model, torch.randint(0, 128, (3, 1)))
    assert len(shares) == len(model.model.layers) and all(torch.allclose(s, torch.ones_like(s)) for s in shares)


def test_a_large_first_position_shows_in_the_residual_ratio() -> None:
    model = tiny_model("llama").eval()
    ids = torch.randint(1, 128, (2, 16))
    ids[:, 0] = 0
    _, plain = first_position_shares(model, ids)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] *= 1000  # token 0 enters the residual stream 1000x larger
    shares, loud = first_position_shares(model, ids)
    assert loud[0] > 50 * plain[0] and all(((s >= 0) & (s <= 1 + 1e-9)).all() for s in shares)
