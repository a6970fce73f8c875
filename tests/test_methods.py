"""Each method against its reference formula, on a single linear layer with known inputs."""

import pytest
import torch
from torch import nn

from statprune_cli.errors import ConfigError
from statprune_cli.masks import nm_mask
from statprune_cli.methods import METHODS, Target, build_method
from statprune_cli.admm import admm_update
from statprune_cli.sketch import nystrom, probe
from statprune_cli.stats import ChannelStats


def layer_and_inputs(seed: int = 0, bias: bool = True) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(32, 16, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(16, generator=g))
    # channels with different means and scales, one outlier channel with a large constant offset
    x = torch.randn(4, 50, 32, generator=g) * torch.linspace(0.2, 3.0, 32) + torch.linspace(-1, 1, 32)
    x[..., 5] += 20.0
    return lin, x


def wanda_reference_mask(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's released code: |W| * sqrt(scaler_row), sort each row (stable), prune the lowest."""
    metric = w.abs() * x.reshape(-1, x.shape[-1]).double().norm(dim=0).float()
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(w.shape[1] * sparsity)]
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def test_wanda_matches_reference_formula() -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().clone()
    stats = ChannelStats.of(x)
    score = METHODS["wanda"]().score(w, stats)
    assert torch.equal(score, w.abs() * x.reshape(-1, 32).double().norm(dim=0).float())
    outcome = METHODS["wanda"]().prune(lin, stats, Target(0.5))
    assert outcome.permutation is None
    assert torch.equal(lin.weight == 0, wanda_reference_mask(w, x, 0.5))


def test_stats_merge_across_batches_equals_one_pass() -> None:
    _, x = layer_and_inputs()
    whole = ChannelStats.of(x)
    merged = ChannelStats.empty(32)
    for part in x.split(1):
        merged.add(ChannelStats.of(part))
    assert merged.count == whole.count == 200
    for f in ("sum", "sumsq", "sumabs"):
        assert torch.allclose(getattr(merged, f), getattr(whole, f), rtol=1e-12)
    x64 = x.reshape(-1, 32).double()
    assert torch.allclose(whole.var, x64.var(0, unbiased=False), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5])
def test_statprune_score_tempers_the_channels_rms(alpha: float) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    got = build_method("statprune", {"alpha": alpha}).score(w, ChannelStats.of(x))
    want = w.abs() * (x.reshape(-1, 32).double() ** 2).mean(0).pow(alpha / 2).float()
    assert torch.allclose(got, want, rtol=1e-6)
    if alpha == 1.0:  # Wanda's score up to a constant per matrix: the same order
        assert torch.equal(got.argsort(1), METHODS["wanda"]().score(w, ChannelStats.of(x)).argsort(1))


def outputs(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lin(x).reshape(-1, lin.out_features).double()


def test_energy_compensation_scales_kept_weights_by_gamma() -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x)
    build_method("statprune", {"beta": 0.5, "energy_targets": ["re:.*"]}).prune(lin, stats, Target(0.5))
    mask = lin.weight == 0
    kept = w.masked_fill(mask, 0)
    gamma = (((w * w) @ stats.m2) / ((kept * kept) @ stats.m2)) ** 0.25
    assert torch.allclose(lin.weight.double(), kept * gamma[:, None], rtol=1e-6)
    assert (gamma > 1).all()


@pytest.mark.parametrize("options,nm,name,scaled", [
    ({"sketch_rank": 0}, (2, 4), "model.layers.0.self_attn.k_proj", False),  # the default: outside attention
    ({"sketch_rank": 0}, (2, 4), "model.decoder.layers.0.attention.dense", False),
    ({"sketch_rank": 0}, (2, 4), "model.layers.0.mlp.down_proj", True),
    ({"sketch_rank": 0}, (2, 4), "model.decoder.layers.0.fc1", True),
    ({"energy_targets": ["re:.*self_attn"]}, None, "model.layers.0.self_attn.q_proj", True),
    ({"energy_targets": ["re:.*self_attn"]}, None, "model.layers.0.mlp.up_proj", False),
    ({"beta": 0.0}, None, "model.layers.0.mlp.up_proj", False),  # beta 0: no restoration anywhere
])
def test_energy_targets_choose_the_linears_whose_energy_is_restored(options: dict, nm: tuple[int, int] | None, name: str,
                                                                    scaled: bool) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().clone()
    build_method("statprune", options, "unstructured" if nm is None else f"{nm[0]}:{nm[1]}").prune(
        lin, ChannelStats.of(x), Target(0.5, nm, name=name))
    assert torch.equal(lin.weight, w.masked_fill(lin.weight == 0, 0)) != scaled  # outside the targets: the mask alone


@pytest.mark.parametrize("pattern,options,sketch,sequential,reorders", [
    ("unstructured", {}, 0, False, False),
    ("2:4", {}, 512, True, True),
    ("1:4", {}, 512, True, True),
    ("4:8", {}, 512, True, True),
    ("2:4", {"sketch_rank": 0}, 0, True, True),
    ("unstructured", {"sketch_rank": 32}, 32, False, False),
    ("2:4", {"preset": "paper"}, 0, True, False),
    ("unstructured", {"preset": "paper"}, 0, False, False),
])
def test_statprune_defaults_follow_the_pattern_and_preset(pattern: str, options: dict, sketch: int, sequential: bool,
                                                          reorders: bool) -> None:
    method = build_method("statprune", options, pattern)
    assert (method.sketch_rank, method.options.beta) == (sketch, 0.5)
    assert method.sequential == sequential
    assert (bool(method.reallocation), method.residual_permutation) == (reorders, reorders)
    assert method.allocation == "uniform"  # energy allocation won on SmolLM2 and lost on Qwen2.5 (docs/methods.md)


def test_the_paper_preset_is_the_score_and_the_energy_compensation_alone() -> None:
    """No sketch, no reordering: the kept weights of a row are its dense ones times one gamma, at N:M too."""
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x)
    name = "model.layers.0.mlp.down_proj"
    build_method("statprune", {"preset": "paper"}, "2:4").prune(lin, stats, Target(0.5, (2, 4), name=name))
    mask = lin.weight == 0
    score = w.abs() * stats.m2.sqrt()
    assert torch.equal(mask, nm_mask(score.float(), 2, 4))
    kept = w.masked_fill(mask, 0)
    gamma = (((w * w) @ stats.m2) / ((kept * kept) @ stats.m2)) ** 0.25
    assert torch.allclose(lin.weight.double(), kept * gamma[:, None], rtol=1e-6)


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pruning.options.preset: expected full or paper, got 'fast'"):
        build_method("statprune", {"preset": "fast"})


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_statprune_default_unstructured_restores_half_the_energy(sparsity: float) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x)
    build_method("statprune", {}).prune(lin, stats, Target(sparsity))
    kept = w.masked_fill(lin.weight == 0, 0)
    gamma = (((w * w) @ stats.m2) / ((kept * kept) @ stats.m2)) ** 0.25
    assert torch.allclose(lin.weight.double(), kept * gamma[:, None], rtol=1e-6)
    assert (lin.weight == 0).sum(1).eq(round(sparsity * lin.in_features)).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_statprune_default_for_nm_runs_admm_on_the_sketch_then_restores_half_the_energy(n: int, m: int) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x, sketch=512)
    build_method("statprune", {}, f"{n}:{m}").prune(lin, stats, Target(n / m, (n, m)))
    updated = w.float()
    k = stats.sketch.shape[1]
    u, lam = nystrom(stats.sketch, probe(w.shape[1], k))
    admm_update(updated, stats.sumsq, u, lam, n / m, (n, m))
    updated, mask = updated.double(), updated == 0
    gamma = (((w * w) @ stats.m2) / ((updated * updated) @ stats.m2)) ** 0.25  # beta 0.5, against the updated row
    assert torch.allclose(lin.weight.double(), updated * gamma[:, None], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(updated, w.masked_fill(mask, 0.0))  # the update moved the kept weights
    assert (lin.weight.reshape(lin.weight.shape[0], -1, m) == 0).sum(-1).eq(n).all()


def test_magnitude_needs_no_data_and_prunes_smallest() -> None:
    lin, _ = layer_and_inputs()
    w = lin.weight.detach().clone()
    METHODS["magnitude"]().prune(lin, None, Target(0.25))
    mask = lin.weight == 0
    assert (mask.sum(1) == 8).all()
    assert (w.abs().masked_fill(~mask, -1).amax(1) <= w.abs().masked_fill(mask, 1e9).amin(1)).all()


def test_nm_through_a_method() -> None:
    lin, x = layer_and_inputs()
    build_method("statprune", {}).prune(lin, ChannelStats.of(x), Target(0.5, nm=(2, 4)))
    assert ((lin.weight == 0).reshape(16, 8, 4).sum(-1) == 2).all()
