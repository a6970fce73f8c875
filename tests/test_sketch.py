"""The sketch of H (sketch.py): its statistics, its factors, its path through the CLI, and the least-squares update it
allows (scripts/experimental.py's ``statprune-ls``) against its formula."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import job, tiny_model, write_config
from test_baselines import correlated_layer, output_error
from test_engine import engine, windows
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.masks import nm_mask, unstructured_mask
from statprune_cli.methods import Target, build_method
from statprune_cli.engine import Collect, Selection
from statprune_cli.sketch import auto_every, nystrom, probe
from statprune_cli.stats import ChannelStats, load_stats, save_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from experimental import least_squares_update  # noqa: E402

runner = CliRunner()


def reference_update(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row by row: w_K += H_KK^-1 H_KP w_P, w_P = 0 (the textbook least-squares update of the kept weights)."""
    out = w.double().clone()
    for r in range(w.shape[0]):
        k, p = (~mask[r]).nonzero()[:, 0], mask[r].nonzero()[:, 0]
        out[r, k] += torch.linalg.solve(h[k][:, k], h[k][:, p] @ out[r, p])
        out[r, p] = 0.0
    return out


def test_a_full_rank_sketch_gives_the_exact_least_squares_update() -> None:
    lin, x = correlated_layer(rows=12, cols=16)
    h = x.double().T @ x.double()
    mask = nm_mask(torch.randn(12, 16, generator=torch.Generator().manual_seed(1)), 2, 4)
    u, lam = nystrom(h @ probe(16, 16).double(), probe(16, 16))
    w = lin.weight.detach().double().clone()
    least_squares_update(w, mask, h.diagonal(), u, lam, damp=0.01, per_row=True)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(w, reference_update(lin.weight.detach(), mask, damped), rtol=1e-4, atol=1e-5)  # G in float32
    assert bool((w[mask] == 0).all())


def test_nystrom_of_a_low_rank_matrix_is_exact_and_leaves_a_psd_residual() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.diag(torch.rand(40, generator=g, dtype=torch.float64))
    u, lam = nystrom(h @ probe(40, 8).double(), probe(40, 8))
    assert torch.allclose(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-8)  # full rank: every direction kept
    assert torch.linalg.eigvalsh(h - (u * lam) @ u.T).min() > -1e-9 * float(lam.max())  # rounding only
    low = a @ a.T  # rank 5 <= 8 probes: recovered exactly
    u, lam = nystrom(low @ probe(40, 8).double(), probe(40, 8))
    assert torch.allclose((u * lam) @ u.T, low, atol=1e-6)


def test_the_sketch_is_a_sum_that_merges_across_batches_and_round_trips(tmp_path: Path) -> None:
    _, x = correlated_layer(cols=32, tokens=300)
    merged = ChannelStats.empty(32)
    for part in x.split(70):
        merged.add(ChannelStats.of(part, sketch=8))
    expected = (x.T @ x) @ probe(32, 8)
    assert torch.allclose(merged.sketch, expected, rtol=1e-4, atol=1e-3)
    assert torch.allclose(ChannelStats.of(x, gram=True).probed(8), expected, rtol=1e-4, atol=1e-3)
    assert ChannelStats.of(x).sketch is None and ChannelStats.of(x).probed(8) is None
    save_stats({"lin": merged}, tmp_path / "s.safetensors", {})
    loaded, _ = load_stats(tmp_path / "s.safetensors")
    assert torch.equal(loaded["lin"].sketch, merged.sketch) and loaded["lin"].probed(8) is loaded["lin"].sketch


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_the_sketch_update_cuts_the_output_error_of_the_same_mask(nm: tuple[int, int] | None) -> None:
    lin, x = correlated_layer(rows=16, cols=32, tokens=600)
    dense = lin.weight.detach().clone()
    errors = {}
    for comp, rank in (("none", 0), ("sketch", 16)):
        pruned = torch.nn.Linear(32, 16, bias=False)
        pruned.weight.data.copy_(dense)
        stats = ChannelStats.of(x, sketch=16)
        pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
        build_method("statprune", {"beta": 0.0, "sketch_rank": rank}, pattern).prune(pruned, stats, Target(0.5, nm))
        errors[comp] = output_error(dense, pruned.weight.detach(), x)
        assert (pruned.weight == 0).sum() == 16 * 16  # the update moves kept weights, never the mask
    assert errors["sketch"] < 0.8 * errors["none"]


def test_the_engine_collects_the_sketch_the_method_asks_for() -> None:
    model, ids = tiny_model("llama"), windows()
    method = build_method("statprune", {"sketch_rank": 4}, "2:4")
    assert method.sketch_rank == 4
    assert build_method("statprune", {}, "2:4").sketch_rank == 512  # the N:M default
    assert build_method("statprune", {}, "unstructured").sketch_rank == 0
    assert build_method("statprune", {"preset": "paper"}, "2:4").sketch_rank == 0
    res = engine(model).run(job(method, Target(0.5, (2, 4))), [ids])
    infos = [r.info for layer in res.layers for r in layer.linears.values()]
    assert infos and all(i["sketch_rank"] == 4 for i in infos)
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # still 2:4


def test_a_strided_sketch_is_the_sampled_tokens_sketch_scaled_up_to_all_of_them() -> None:
    x = torch.randn(3, 41, 16, generator=torch.Generator().manual_seed(4))[:, 1:]  # a skipped position: not contiguous
    full, strided = ChannelStats.of(x, sketch=8), ChannelStats.of(x, sketch=8, sketch_every=4)
    sampled = torch.cat([window[::4] for window in x])  # every 4th token of each window: 10 of its 40
    assert torch.allclose(strided.sketch, 4.0 * sampled.T @ (sampled @ probe(16, 8)), rtol=1e-5, atol=1e-4)
    assert strided.count == full.count == 120 and torch.equal(strided.sumsq, full.sumsq)  # the diagonal from every token
    assert not torch.allclose(strided.sketch, full.sketch, rtol=0.05)


def test_the_engine_takes_the_sketch_on_the_stride_it_is_given() -> None:
    model, ids = tiny_model("llama"), windows()
    with torch.no_grad():  # layer 0's q_proj reads the normalised embeddings
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    for every in (1, 3):
        stats = engine(model).statistics([ids], Selection(), Collect(sketch=4, sketch_every=every))
        q = stats["model.layers.0.self_attn.q_proj"].sketch
        assert torch.allclose(q, ChannelStats.of(x, sketch=4, sketch_every=every).sketch, rtol=1e-4, atol=1e-4)
    unset = engine(model).statistics([ids], Selection(), Collect(sketch=4))  # 6 windows: under 8,192 tokens
    assert torch.equal(unset["model.layers.0.self_attn.q_proj"].sketch, ChannelStats.of(x, sketch=4).sketch)
    method = build_method("statprune", {"sketch_every": 3}, "2:4")
    assert method.sketch_every == 3 and build_method("statprune", {}, "2:4").sketch_every is None  # None: auto_every
    with pytest.raises(Exception, match="pruning.options.sketch_every"):
        build_method("statprune", {"sketch_every": 0})


@pytest.mark.parametrize("windows_of_512,every", [(8, 1), (16, 1), (32, 2), (64, 4), (128, 4), (1024, 4)])
def test_the_automatic_stride_reads_every_4th_token_but_never_fewer_than_8192(windows_of_512: int, every: int) -> None:
    assert auto_every(windows_of_512 * 512) == every


def test_one_shot_from_stats_without_the_sketch_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                            text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")
    sketched = ["--set", "pruning.method=statprune", "--set", "pruning.options.sketch_rank=4"]
    plain = tmp_path / "plain.stats.safetensors"
    assert runner.invoke(app, ["calibrate", str(cfg), "-q", "-o", str(plain)]).exit_code == 0
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--stats", str(plain), *sketched])
    assert res.exit_code == 2 and "has no 4-probe sketch" in res.stderr and "ADMM update" in res.stderr
    with_sketch = tmp_path / "sketch.stats.safetensors"
    assert runner.invoke(app, ["calibrate", str(cfg), "-q", "-o", str(with_sketch), *sketched]).exit_code == 0
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json", "--stats", str(with_sketch), *sketched])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_sketch_rank_must_not_be_negative() -> None:
    with pytest.raises(Exception, match="pruning.options.sketch_rank: expected an integer >= 0, got -1"):
        build_method("statprune", {"sketch_rank": -1})


def test_the_shared_solve_follows_its_formula_and_still_cuts_the_error() -> None:
    lin, x = correlated_layer(rows=12, cols=16)
    h = x.double().T @ x.double()
    mask = unstructured_mask(torch.randn(12, 16, generator=torch.Generator().manual_seed(2)), 0.5)
    mask[0] = False  # a row that keeps every weight (f = 1) is left as it is
    mask[1, :12] = True  # and one that keeps a quarter
    u, lam = nystrom(h @ probe(16, 6).double(), probe(16, 6))
    w = lin.weight.detach().double().clone()
    least_squares_update(w, mask, h.diagonal(), u, lam, damp=0.01)
    d = h.diagonal() - (u.square() * lam).sum(1) + 0.01 * h.diagonal().mean()
    w0 = lin.weight.detach().double()
    for r in range(12):
        f = float((~mask[r]).double().mean())
        t = torch.linalg.solve(torch.diag(1 / lam) + f * (u.T / d) @ u, u.T @ (w0[r] * mask[r]))
        expected = (w0[r] + (u @ t) / d) * ~mask[r]
        assert torch.allclose(w[r], expected, rtol=1e-4, atol=1e-5), r
    assert output_error(w0, w, x) < 0.9 * output_error(w0, w0.masked_fill(mask, 0.0), x)


def test_more_probes_than_channels_sketch_the_gram_itself() -> None:
    lin, x = correlated_layer(rows=8, cols=16)
    stats = ChannelStats.of(x, sketch=64)
    assert stats.sketch.shape == (16, 16) and stats.probed(64) is stats.sketch
    w, exact = lin.weight.detach().double().clone(), lin.weight.detach().double().clone()
    mask = nm_mask(w.abs(), 2, 4)
    u, lam = nystrom(stats.probed(64), probe(16, 16))
    least_squares_update(w, mask, stats.sumsq, u, lam, damp=0.01, per_row=True)
    h = x.double().T @ x.double()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(w, reference_update(exact, mask, damped), rtol=1e-3, atol=1e-4)


def test_a_rank_deficient_float32_sketch_still_factors() -> None:
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, 3, 32)  # 6 tokens, 32 channels
    stats = ChannelStats.of(x, sketch=32)
    u, lam = nystrom(stats.sketch, probe(32, 32))
    assert int((lam > 1e-6 * lam.max()).sum()) <= 6 and torch.isfinite(u).all()
