"""scripts/damping_probe.py, whose figures in docs/methods.md say where SparseGPT's damping swamps the curvature."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from damping_probe import damped_shares  # noqa: E402

from conftest import tiny_model  # noqa: E402


def test_one_massive_input_channel_puts_the_others_below_the_damping() -> None:
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 128, (2, 16))
    before = damped_shares(model, ids)
    assert len(before) == 3 * 7 and before["layers.0.self_attn.q_proj"][0] < 0.2
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = 1e3  # q/k/v of layer 0 see one huge channel
    after = damped_shares(model, ids)
    assert after["layers.0.self_attn.q_proj"][0] == after["layers.0.self_attn.v_proj"][0] == 63 / 64
    assert damped_shares(model, ids, percdamp=0.0)["layers.0.self_attn.q_proj"][0] == 0.0


def test_the_first_positions_share_of_the_trace() -> None:
    model = tiny_model("llama").eval()
    one = damped_shares(model, torch.randint(0, 128, (2, 1)))
    assert all(abs(first - 1) < 1e-12 for _, first in one.values())  # one-position windows: all of it
    ids = torch.randint(0, 128, (3, 16))
    shares = damped_shares(model, ids)
    assert 0 < shares["layers.0.self_attn.q_proj"][1] < 0.5
