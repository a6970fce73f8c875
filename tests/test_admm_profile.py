"""scripts/admm_profile.py: the bfloat16 solve its timings compare must solve the same system as the product's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from admm_profile import Bf16System  # noqa: E402

from statprune_cli.admm import SketchSystem  # noqa: E402
from statprune_cli.sketch import nystrom, probe  # noqa: E402


def test_the_bfloat16_solve_matches_the_float32_one_within_bfloat16_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = (x.T @ x).double()
    u, lam = nystrom(h @ probe(64, 64).double(), probe(64, 64))
    r = torch.randn(32, 64, generator=g)
    want = SketchSystem.of(h.diagonal(), u, lam).solve_(r.clone())
    got = Bf16System.of(h.diagonal(), u, lam).solve_(r.clone())
    assert got.dtype == torch.float32
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 2e-2  # bfloat16 keeps 8 bits of mantissa: rounded, not equal, and not far off
