"""scripts/mask_shape.py: the README's account of RIA under OWL rests on its counts and lost shares."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from mask_shape import measure  # noqa: E402

from statprune_cli.stats import ChannelStats  # noqa: E402


def test_counts_and_lost_shares_match_the_mask(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dense = {f"model.layers.{i}.mlp.up_proj": torch.randn(100, 6, generator=g) for i in (0, 1)}
    stats = {n: ChannelStats.of(torch.randn(32, 6, generator=g) * torch.arange(1, 7)) for n in dense}
    pruned = {n: w.clone() for n, w in dense.items()}
    pruned["model.layers.0.mlp.up_proj"][:, 2] = 0  # a dead column
    pruned["model.layers.0.mlp.up_proj"][:3, :5] = 0  # three rows 5/6 zero (above 0.8)
    pruned["model.layers.1.mlp.up_proj"][:, :3] = 0  # half of every row: three dead columns
    save_file({f"{n}.weight": w for n, w in pruned.items()} | {"model.embed_tokens.weight": torch.zeros(8, 6)},
              tmp_path / "model.safetensors")
    kinds, layers = measure(tmp_path, 0.8, dense, stats)

    def reference(name: str) -> tuple[float, float]:
        energy = ((dense[name].abs() * stats[name].sumsq.sqrt().float()) ** 2).double()
        lost = energy * (pruned[name] == 0)
        return float(lost.sum() / energy.sum()), float((lost.sum(1) / energy.sum(1)).quantile(0.99))

    (lost0, p0), (lost1, p1) = (reference(n) for n in dense)
    sparsity0 = (100 + 3 * 4) / 600
    assert list(kinds) == ["mlp.up_proj"] and list(kinds["mlp.up_proj"]) == [0, 1]
    assert kinds["mlp.up_proj"][0] == pytest.approx([sparsity0, 0.03, 1 / 6, 1 / 6, lost0, p0], rel=1e-6)
    assert kinds["mlp.up_proj"][1] == pytest.approx([0.5, 0.0, 0.5, 0.5, lost1, p1], rel=1e-6)
    assert layers == {0: pytest.approx((sparsity0, lost0)), 1: pytest.approx((0.5, lost1))}
