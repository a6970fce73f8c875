"""Each method against its reference formula, on a single linear layer with known inputs."""

import pytest
import torch
from torch import nn

from statprune_cli.methods import METHODS, Target, build_method
from statprune_cli.methods.statprune import SKETCH_DAMP
from statprune_cli.sketch import least_squares_update, nystrom, probe
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
    info, refiner = METHODS["wanda"]().prune(lin, stats, Target(0.5))
    assert refiner is None
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


@pytest.mark.parametrize("score,expected", [
    ("variance", lambda x: x.var(0, unbiased=False).sqrt()),
    ("tempered", lambda x: (x * x).mean(0).pow(0.25)),
    ("first_order", lambda x: x.abs().mean(0)),
    ("magnitude", lambda x: torch.ones(x.shape[1], dtype=x.dtype)),
])
def test_statprune_scores(score: str, expected) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    method = build_method("statprune", {"score": score, "alpha": 0.5})
    got = method.score(w, ChannelStats.of(x))
    want = w.abs() * expected(x.reshape(-1, 32).double()).float()
    assert torch.allclose(got, want, rtol=1e-6)


def test_variance_score_ignores_constant_offset_that_wanda_follows() -> None:
    lin, x = layer_and_inputs()
    stats = ChannelStats.of(x)
    w = lin.weight.detach()
    wanda = METHODS["wanda"]().score(w, stats)
    var = build_method("statprune", {"score": "variance"}).score(w, stats)
    # channel 5 carries a +20 offset: Wanda keeps it in every row, the variance score prunes it where |W| is small
    from statprune_cli.masks import unstructured_mask

    assert not unstructured_mask(wanda, 0.5)[:, 5].any()
    assert unstructured_mask(var, 0.5)[:, 5].sum() >= 4


def outputs(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lin(x).reshape(-1, lin.out_features).double()


def test_mean_compensation_keeps_output_mean() -> None:
    lin, x = layer_and_inputs()
    dense_mean = outputs(lin, x).mean(0)
    build_method("statprune", {"compensation": "mean"}).prune(lin, ChannelStats.of(x), Target(0.5))
    assert (lin.weight == 0).sum(1).eq(16).all()
    assert torch.allclose(outputs(lin, x).mean(0), dense_mean, atol=1e-4)
    # without compensation the mean moves (the check above can fail)
    lin2, _ = layer_and_inputs()
    build_method("statprune", {"compensation": "none"}).prune(lin2, ChannelStats.of(x), Target(0.5))
    assert not torch.allclose(outputs(lin2, x).mean(0), dense_mean, atol=1e-2)


def test_energy_compensation_scales_kept_weights_by_gamma() -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x)
    build_method("statprune", {"compensation": "energy", "beta": 0.5, "score": "variance"}).prune(lin, stats, Target(0.5))
    mask = lin.weight == 0
    kept = w.masked_fill(mask, 0)
    gamma = (((w * w) @ stats.m2) / ((kept * kept) @ stats.m2)) ** 0.25
    assert torch.allclose(lin.weight.double(), kept * gamma[:, None], rtol=1e-6)
    assert (gamma > 1).all()


@pytest.mark.parametrize("options,nm,name,scaled", [
    ({"compensation": "energy"}, (2, 4), "model.layers.0.self_attn.k_proj", False),  # the default: outside attention
    ({"compensation": "energy"}, (2, 4), "model.decoder.layers.0.attention.dense", False),
    ({"compensation": "energy"}, (2, 4), "model.layers.0.mlp.down_proj", True),
    ({"compensation": "energy"}, (2, 4), "model.decoder.layers.0.fc1", True),
    ({"compensation": "energy", "energy_targets": ["re:.*self_attn"]}, None, "model.layers.0.self_attn.q_proj", True),
    ({"compensation": "energy", "energy_targets": ["re:.*self_attn"]}, None, "model.layers.0.mlp.up_proj", False),
])
def test_energy_targets_choose_the_linears_whose_energy_is_restored(options: dict, nm: tuple[int, int] | None, name: str,
                                                                    scaled: bool) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().clone()
    build_method("statprune", options, "unstructured" if nm is None else f"{nm[0]}:{nm[1]}").prune(
        lin, ChannelStats.of(x), Target(0.5, nm, name=name))
    assert torch.equal(lin.weight, w.masked_fill(lin.weight == 0, 0)) != scaled  # outside the targets: the mask alone


@pytest.mark.parametrize("pattern,options,compensation,skip,sequential", [
    ("unstructured", {}, "energy", 1, False),
    ("2:4", {}, "sketch+energy", 0, True),
    ("1:4", {}, "sketch+energy", 0, True),
    ("4:8", {}, "sketch+energy", 0, True),
    ("2:4", {"compensation": "none"}, "none", 0, True),
    ("unstructured", {"compensation": "none"}, "none", 1, False),
    ("unstructured", {"compensation": "mean", "skip_first_tokens": 3}, "mean", 3, False),
])
def test_statprune_defaults_follow_the_pattern(pattern: str, options: dict, compensation: str, skip: int,
                                               sequential: bool) -> None:
    method = build_method("statprune", options, pattern)
    assert (method.options.compensation, method.options.skip_first_tokens, method.options.beta) == (compensation, skip, 0.5)
    assert method.sequential == sequential


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
def test_statprune_default_for_nm_updates_from_the_sketch_then_restores_half_the_energy(n: int, m: int) -> None:
    lin, x = layer_and_inputs()
    w = lin.weight.detach().double().clone()
    stats = ChannelStats.of(x, sketch=256)
    build_method("statprune", {}, f"{n}:{m}").prune(lin, stats, Target(n / m, (n, m)))
    mask = lin.weight == 0
    updated = w.clone()
    k = stats.sketch.shape[1]
    u, lam = nystrom(stats.sketch, probe(w.shape[1], k))
    least_squares_update(updated, mask, stats.sumsq, u, lam, SKETCH_DAMP, per_row=False)
    gamma = (((w * w) @ stats.m2) / ((updated * updated) @ stats.m2)) ** 0.25  # beta 0.5, against the updated row
    assert torch.allclose(lin.weight.double(), updated * gamma[:, None], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(updated, w.masked_fill(mask, 0.0))  # the update moved the kept weights
    assert (lin.weight.reshape(lin.weight.shape[0], -1, m) == 0).sum(-1).eq(n).all()


def test_energy_on_variance_scales_and_the_bias_takes_back_only_the_scalings_mean_shift() -> None:
    lin, x = layer_and_inputs()
    w, b0 = lin.weight.detach().double().clone(), lin.bias.detach().double().clone()
    stats = ChannelStats.of(x)
    build_method("statprune", {"compensation": "energy", "energy_stat": "s2", "beta": 1.0}).prune(lin, stats, Target(0.5))
    kept = w.masked_fill(lin.weight == 0, 0)
    gamma = (((w * w) @ stats.var) / ((kept * kept) @ stats.var)) ** 0.5
    new = kept * gamma[:, None]
    assert torch.allclose(lin.weight.double(), new, rtol=1e-6)
    assert torch.allclose(lin.bias.double() - b0, kept @ stats.mean - new @ stats.mean, rtol=1e-5, atol=1e-5)


def test_both_compensations_restore_the_dense_mean_after_scaling() -> None:
    lin, x = layer_and_inputs()
    dense_mean = outputs(lin, x).mean(0)
    build_method("statprune", {"compensation": "both", "beta": 1.0}).prune(lin, ChannelStats.of(x), Target(0.5))
    assert torch.allclose(outputs(lin, x).mean(0), dense_mean, atol=1e-4)


def test_mean_compensation_without_a_bias_is_reported_not_applied() -> None:
    lin, x = layer_and_inputs(bias=False)
    info, _ = build_method("statprune", {"compensation": "mean"}).prune(lin, ChannelStats.of(x), Target(0.5))
    assert lin.bias is None
    assert "cannot take a bias" in info["mean_compensation"]


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


@pytest.mark.parametrize("bias,compensation", [(True, "measured"), (False, "measured"), (True, "measured_scale")])
def test_measured_compensation_is_the_least_squares_row_map(bias: bool, compensation: str) -> None:
    lin, x = layer_and_inputs(bias=bias)
    dense = outputs(lin, x)
    b0 = lin.bias.detach().double().clone() if bias else 0.0
    method = build_method("statprune", {"compensation": compensation, "measure_tokens": 10_000})
    _, refiner = method.prune(lin, ChannelStats.of(x), Target(0.5))
    pruned = outputs(lin, x)
    for batch in x.split(2):
        refiner.observe(batch)
    info = refiner.apply()
    assert info["measured_tokens"] == 200
    fixed = outputs(lin, x)
    # reference: per row, least squares of the dense output on the pruned one (with an intercept when there is a bias)
    p, y = pruned - b0, dense - b0
    if compensation == "measured_scale":
        assert torch.equal(lin.bias.detach().double(), b0)
        bias = False
    if bias:
        c = ((y - y.mean(0)) * (p - p.mean(0))).mean(0) / (p - p.mean(0)).pow(2).mean(0)
    else:
        c = (y * p).mean(0) / (p * p).mean(0)
    b_new = lin.bias.detach().double() if lin.bias is not None else 0.0
    assert torch.allclose(fixed - b_new, c.clamp(0.5, 2.0) * p, atol=1e-4)
    assert ((fixed - dense) ** 2).mean() < ((pruned - dense) ** 2).mean()
    if bias:
        assert torch.allclose(fixed.mean(0), dense.mean(0), atol=1e-4)


def balance_reference(w, mask, score, stats, cycles, nm=None, p=1.0):
    """The mean-balancing swaps written as a plain loop over rows and candidates (the rule in statprune.py's docstring)."""
    mask = mask.clone()
    d = w.double() * stats.mean
    ratio = d / stats.var.clamp_min(1e-12).pow(p)
    for i in range(w.shape[0]):
        err = float((d[i] * mask[i]).sum())
        cols = range(w.shape[1])
        grow = [sorted((j for j in cols if mask[i, j] and d[i, j] > 0), key=lambda j: -ratio[i, j])[:cycles],
                sorted((j for j in cols if mask[i, j] and d[i, j] < 0), key=lambda j: ratio[i, j])[:cycles]]
        drop = [sorted((j for j in cols if not mask[i, j] and d[i, j] < 0), key=lambda j: score[i, j])[:cycles],
                sorted((j for j in cols if not mask[i, j] and d[i, j] > 0), key=lambda j: score[i, j])[:cycles]]
        protected = set()
        pg, pd = [0, 0], [0, 0]
        for _ in range(cycles):
            side = 0 if err > 0 else 1
            if pg[side] >= len(grow[side]) or (nm is None and pd[side] >= len(drop[side])):
                break
            g = grow[side][pg[side]]
            if nm is None:
                q = drop[side][pd[side]]
            else:
                start = g - g % nm[1]
                q = min((j for j in range(start, start + nm[1]) if not mask[i, j] and j not in protected), key=lambda j: score[i, j])
            new = err + float(d[i, q]) - float(d[i, g])
            if abs(new) < abs(err):
                mask[i, g], mask[i, q], err = False, True, new
                pd[side] += 1
                protected |= {g, q}
            pg[side] += 1
    return mask


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_mean_balancing_matches_the_plain_loop_and_keeps_the_pattern(nm) -> None:
    from statprune_cli.masks import make_mask
    from statprune_cli.methods.statprune import balance_mean

    lin, x = layer_and_inputs(seed=3)
    w, stats = lin.weight.detach().clone(), ChannelStats.of(x)
    score = w.abs() * stats.m2.sqrt().float()
    mask = make_mask(score, 0.5, nm, "row")
    out = balance_mean(w, mask, score, stats, 6, nm)
    assert torch.equal(out, balance_reference(w, mask, score, stats, 6, nm))
    assert (out != mask).any()
    assert torch.equal(out.sum(1), mask.sum(1))
    if nm:
        assert (out.reshape(16, -1, nm[1]).sum(-1) == nm[0]).all()
    d = w.double() * stats.mean
    before, after = (d * mask).sum(1).abs(), (d * out).sum(1).abs()
    assert (after <= before).all() and after.sum() < 0.5 * before.sum()


def test_statprune_balance_option_changes_only_the_mask() -> None:
    lin, x = layer_and_inputs(seed=1)
    plain, balanced = nn.Linear(32, 16), nn.Linear(32, 16)
    plain.load_state_dict(lin.state_dict())
    balanced.load_state_dict(lin.state_dict())
    stats = ChannelStats.of(x)
    none = {"compensation": "none"}  # the mask alone: the weights it keeps stay as they were
    build_method("statprune", none).prune(plain, stats, Target(0.5))
    build_method("statprune", {**none, "balance_cycles": 8}).prune(balanced, stats, Target(0.5))
    kept = balanced.weight != 0
    assert torch.equal(balanced.weight[kept], lin.weight[kept])
    assert not torch.equal(kept, plain.weight != 0)
    shift = lambda m: (outputs(m, x) - outputs(lin, x)).mean(0).abs().mean()  # noqa: E731
    assert shift(balanced) < shift(plain)


@pytest.mark.parametrize("options,key", [({"balance_cycles": -1}, "balance_cycles"), ({"balance_var_power": -0.5}, "balance_var_power")])
def test_balance_options_are_checked(options, key) -> None:
    from statprune_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=f"pruning.options.{key}"):
        build_method("statprune", options)


def test_balance_targets_select_linears_by_name() -> None:
    lin, x = layer_and_inputs(seed=1)
    stats, w = ChannelStats.of(x), lin.weight.detach().float()
    method = build_method("statprune", {"balance_cycles": 8, "balance_targets": ["re:.*self_attn"]})
    plain = build_method("statprune", {})
    score = method.score(w, stats)
    attn, mlp = (Target(0.5, name=f"model.layers.0.{n}") for n in ("self_attn.q_proj", "mlp.up_proj"))
    assert torch.equal(method.mask(w, score, stats, mlp)[0], plain.mask(w, score, stats, mlp)[0])
    assert not torch.equal(method.mask(w, score, stats, attn)[0], plain.mask(w, score, stats, attn)[0])
    from statprune_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="pruning.options.balance_targets"):
        build_method("statprune", {"balance_targets": 5})
