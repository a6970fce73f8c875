"""SparseGPT, RIA and the OWL profile against their formulas, on single layers and through the CLI."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, COMMON, prune_report, tiny_model, tiny_tokenizer, write_config
from safetensors.torch import load_file
from test_masks import kept_score
from torch import nn
from transformers import AutoModelForCausalLM, BitNetConfig, LlamaConfig, Phi3Config
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.masks import reallocation_order, refine_order
from statprune_cli.methods import Target, build_method
from statprune_cli.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from statprune_cli.permute import absorb, head_blocks, producers
from statprune_cli.profile import outlier_ratio, owl_sparsities
from statprune_cli.stats import ChannelStats


def correlated_layer(rows: int = 16, cols: int = 32, tokens: int = 400, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer and inputs whose channels are strongly correlated (where reconstruction pays)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=g))
    mix = 2 * torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) * torch.linspace(0.3, 2.0, cols)) @ mix
    return lin, x


def output_error(w: torch.Tensor, w_pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x.double() @ (w.double() - w_pruned.double()).T).norm())


def test_gram_merges_across_batches() -> None:
    _, x = correlated_layer()
    merged = ChannelStats.empty(32)
    for part in x.split(7):
        merged.add(ChannelStats.of(part, gram=True))
    assert torch.allclose(merged.gram, x.T @ x, rtol=1e-5, atol=1e-4)
    assert ChannelStats.of(x).gram is None


def test_sparsegpt_single_pruned_column_is_the_obs_update() -> None:
    """Pruning only the first column: the others move by -w_0 / [H^-1]_00 * H^-1[0, :] (Optimal Brain Surgeon)."""
    lin, x = correlated_layer(rows=4, cols=8)
    with torch.no_grad():
        lin.weight[:, 0] = 1e-3  # the lowest w^2 / [H^-1]_qq^2 of every row
    w = lin.weight.detach().double().clone()
    h = 2 * x.double().T @ x.double() / x.shape[0]
    h += 0.01 * torch.diag(h).mean() * torch.eye(8, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    expected = w - w[:, :1] / hinv[0, 0] * hinv[0:1, :]
    build_method("sparsegpt", {"blocksize": 8}).prune(lin, ChannelStats.of(x, gram=True), Target(1 / 8, granularity="row"))
    got = lin.weight.detach().double()
    assert torch.all(got[:, 0] == 0)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("target", [Target(0.5, granularity="matrix"), Target(0.5, granularity="row"), Target(0.5, (2, 4)),
                                    Target(0.5, (4, 8))])
def test_sparsegpt_reconstructs_better_than_wanda(target: Target) -> None:
    lin, x = correlated_layer()
    dense = lin.weight.detach().clone()
    wanda = nn.Linear(32, 16, bias=False)
    wanda.weight.data.copy_(dense)
    build_method("wanda", {}).prune(wanda, ChannelStats.of(x), target)
    build_method("sparsegpt", {"blocksize": 8}).prune(lin, ChannelStats.of(x, gram=True), target)
    w = lin.weight.detach()
    assert int((w == 0).sum()) == int((wanda.weight == 0).sum()) == dense.numel() // 2
    if target.nm:
        n, m = target.nm
        assert ((w.reshape(16, -1, m) == 0).sum(-1) >= n).all()
    assert output_error(dense, w, x) < 0.85 * output_error(dense, wanda.weight.detach(), x)


@pytest.mark.parametrize("target,blocksize", [(Target(0.5, granularity="matrix"), 12), (Target(0.5, (2, 4)), 4)])
def test_sparsegpt_equals_sequential_obs_with_explicit_inverses(target: Target, blocksize: int) -> None:
    """The blocked Cholesky form equals pruning the columns in order, each with the inverse Hessian of the columns left."""
    lin, x = correlated_layer(rows=6, cols=12)
    stats = ChannelStats.of(x, gram=True)
    hinv, _ = inverse_hessian_factor(stats.gram, stats.count, 0.01)
    d = torch.diag(hinv).double()
    w = lin.weight.detach().double().clone()
    h = 2 * stats.gram.double() / stats.count
    h += 0.01 * torch.diag(h).mean() * torch.eye(12, dtype=torch.float64)
    mask = torch.zeros(6, 12, dtype=torch.bool)
    if target.nm is None:  # one block: the mask comes from the initial weights, over the whole matrix
        mask.view(-1)[(w**2 / d**2).flatten().argsort()[:36]] = True
    for i in range(12):
        if target.nm and i % 4 == 0:  # N:M: every M columns, from the weights updated so far
            idx = (w[:, i:i + 4] ** 2 / d[i:i + 4] ** 2).argsort(dim=1)[:, :2]
            mask[:, i:i + 4].scatter_(1, idx, True)
        inv = torch.linalg.inv(h[i:, i:])
        e = torch.where(mask[:, i], w[:, i] / inv[0, 0], torch.zeros(6, dtype=torch.float64))
        w[:, i:] -= e[:, None] * inv[0:1, :]
    got = sparsegpt_prune(lin.weight.detach().float().clone(), hinv, target, blocksize=blocksize)
    assert torch.equal(got == 0, mask)
    assert torch.allclose(got.double(), w, atol=1e-4)


def test_sparsegpt_dead_channels_are_zeroed_and_unstructured_block_counts_are_exact() -> None:
    lin, x = correlated_layer(rows=8, cols=16)
    x[:, 3] = 0.0
    stats = ChannelStats.of(x, gram=True)
    hinv, dead = inverse_hessian_factor(stats.gram, stats.count, 0.01)
    assert dead.tolist() == [i == 3 for i in range(16)]
    w = lin.weight.detach().float().clone()
    w[:, dead] = 0
    out = sparsegpt_prune(w, hinv, Target(0.5, granularity="matrix"), blocksize=4)
    assert torch.all(out[:, 3] == 0)
    for block in out.split(4, dim=1):
        assert int((block == 0).sum()) >= block.numel() // 2
    assert torch.isfinite(out).all()


def test_ria_score_is_the_formula() -> None:
    lin, x = correlated_layer(rows=5, cols=6)
    w = lin.weight.detach()
    norms = x.double().norm(dim=0)
    expected = torch.empty(5, 6)
    for i in range(5):
        for j in range(6):
            a = abs(float(w[i, j]))
            expected[i, j] = (a / float(w[:, j].abs().sum()) + a / float(w[i].abs().sum())) * float(norms[j]) ** 0.5
    assert torch.allclose(build_method("ria", {}).score(w, ChannelStats.of(x)), expected, rtol=1e-5)


def test_ria_unstructured_compares_over_the_whole_matrix() -> None:
    lin, x = correlated_layer()
    w = lin.weight.detach().clone()
    build_method("ria", {}).prune(lin, ChannelStats.of(x), Target(0.5, granularity="matrix"))
    zeros = lin.weight == 0
    assert int(zeros.sum()) == w.numel() // 2
    score = build_method("ria", {}).score(w, ChannelStats.of(x))
    assert score[zeros].max() <= score[~zeros].min()
    assert len(set(zeros.sum(1).tolist())) > 1  # rows lose different counts: not a per-row rule


@pytest.mark.parametrize("method,profile,granularity,expected", [
    ("ria", "uniform", None, "matrix"), ("ria", "owl", None, "row"), ("ria", "owl", "matrix", "matrix"),
    ("sparsegpt", "owl", None, "matrix"), ("magnitude", "owl", None, "matrix"), ("wanda", "owl", None, "row")])
def test_ria_compares_within_rows_under_owl_unless_granularity_says(method: str, profile: str, granularity: str | None,
                                                                   expected: str) -> None:
    """RIA's per-matrix comparison and OWL's layer budget do not add up (README, OWL): under OWL it compares per row."""
    from statprune_cli.config import Config
    from statprune_cli.plan import make_plan

    cfg = Config()
    cfg.pruning.method, cfg.pruning.profile, cfg.pruning.granularity = method, profile, granularity
    assert make_plan(cfg).granularity == expected


@pytest.mark.parametrize("granularity", [None, "row"])
def test_magnitude_compares_over_the_whole_matrix_unless_granularity_says_row(granularity: str | None) -> None:
    """The papers' magnitude baseline (Wanda's, SparseGPT's, OWL's code) takes one threshold per matrix."""
    from statprune_cli.config import Config
    from statprune_cli.plan import make_plan

    cfg = Config()
    cfg.pruning.method, cfg.pruning.granularity = "magnitude", granularity
    method = build_method("magnitude", {})
    target = make_plan(cfg, method).target()
    lin, _ = correlated_layer()
    w = lin.weight.detach().clone()
    method.prune(lin, None, target)
    zeros = lin.weight == 0
    assert int(zeros.sum()) == w.numel() // 2
    if granularity is None:
        assert target.granularity == "matrix" and w.abs()[zeros].max() <= w.abs()[~zeros].min()
        assert len(set(zeros.sum(1).tolist())) > 1
    else:
        assert zeros.sum(1).tolist() == [w.shape[1] // 2] * w.shape[0]


def test_reallocation_order_keeps_the_function_and_spreads_each_tier_over_the_groups() -> None:
    lin, x = correlated_layer()
    w = lin.weight.detach().clone()
    score = build_method("ria", {}).score(w, ChannelStats.of(x))
    order = reallocation_order(score, 4)
    assert sorted(order.tolist()) == list(range(32))
    assert torch.allclose(x[:, order] @ w[:, order].T, x @ w.T, atol=1e-5)  # the permuted layer, before pruning
    tier = torch.empty(32, dtype=torch.long)
    tier[torch.argsort(score.sum(0), stable=True)] = torch.arange(32) // 8  # importance quartile of each channel
    assert (tier[order].reshape(8, 4).sort(-1).values == torch.arange(4)).all()  # one channel of each quartile per group


@pytest.mark.parametrize("method,options", [("ria", {}), ("wanda", {}), ("statprune", {"alpha": 0.5})])
def test_reallocation_gives_the_method_mask_of_the_permuted_layer_mapped_back(method: str, options: dict) -> None:
    lin, x = correlated_layer()
    w = lin.weight.detach().clone()
    m = build_method(method, options, "2:4")
    order = reallocation_order(m.score(w, ChannelStats.of(x)), 4)
    permuted = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        permuted.weight.copy_(w[:, order])
    # statprune's N:M default updates from a sketch: with as many probes as inputs it is exact in either channel order
    m.prune(permuted, ChannelStats.of(x[:, order], sketch=32), Target(0.5, (2, 4)))  # the same rule on the permuted layer
    outcome = m.prune(lin, ChannelStats.of(x, sketch=32), Target(0.5, (2, 4), reallocation=True))
    assert torch.equal(outcome.permutation.long(), order)  # saved by the engine in pruning_extras.safetensors
    assert torch.equal(lin.weight.detach()[:, order] == 0, permuted.weight.detach() == 0)
    assert torch.allclose(lin.weight.detach()[:, order], permuted.weight.detach(), rtol=1e-3, atol=1e-4)  # sums reordered
    assert ((lin.weight.detach()[:, order].reshape(16, -1, 4) == 0).sum(-1) == 2).all()  # N:M in that order
    assert "reallocation_kept_score_gain" in outcome.info


@pytest.mark.parametrize("method", ["ria", "statprune"])
def test_lsa_prunes_n_m_in_the_refined_order_and_keeps_more_score(method: str) -> None:
    lin, x = correlated_layer()
    w = lin.weight.detach().clone()
    m = build_method(method, {}, "2:4")
    stats = ChannelStats.of(x, sketch=32)  # statprune's N:M update reads a sketch (k 512 of 32 inputs: 32); the scores do not
    score = m.score(w, stats)
    heuristic = m.prune(correlated_layer()[0], stats, Target(0.5, (2, 4), reallocation=True)).info
    outcome = m.prune(lin, stats, Target(0.5, (2, 4), reallocation=True, lsa=True))
    info = outcome.info
    order = refine_order(score, reallocation_order(score, 4), 2, 4)
    assert torch.equal(outcome.permutation.long(), order)
    assert ((lin.weight.detach()[:, order].reshape(16, -1, 4) == 0).sum(-1) == 2).all()
    assert info["reallocation_kept_score_gain"] > heuristic["reallocation_kept_score_gain"]
    expected = kept_score(score, order, 2, 4) / kept_score(score, torch.arange(32), 2, 4) - 1
    assert info["reallocation_kept_score_gain"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lsa", [False, True])
def test_an_order_within_blocks_is_each_shared_groups_order_on_their_stacked_scores(lsa: bool) -> None:
    """An attention's output projection: 4 heads of 8 channels, heads 0-1 and 2-3 sharing values (and an order)."""
    score = torch.rand(6, 32, generator=torch.Generator().manual_seed(0))
    order = Target(0.5, (2, 4), reallocation=True, lsa=lsa, blocks=(8, 2)).channel_order(score)
    for g in range(2):
        stacked = torch.cat([score[:, 16 * g:16 * g + 8], score[:, 16 * g + 8:16 * g + 16]])
        within = Target(0.5, (2, 4), reallocation=True, lsa=lsa).channel_order(stacked)
        assert torch.equal(order[16 * g:16 * g + 8], 16 * g + within)
        assert torch.equal(order[16 * g + 8:16 * g + 16], 16 * g + 8 + within)


@pytest.mark.parametrize("lsa", [False, True])
def test_sparsegpt_reallocation_reconstructs_the_permuted_layer_in_wanda_order(lsa: bool) -> None:
    lin, x = correlated_layer()
    w = lin.weight.detach().clone()
    order = reallocation_order(w.abs() * x.norm(dim=0), 4)
    if lsa:
        refined = refine_order(w.abs() * x.norm(dim=0), order, 2, 4)
        assert not torch.equal(refined, order)  # else this case could not tell whether sparsegpt refines
        order = refined
    permuted = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        permuted.weight.copy_(w[:, order])
    sparsegpt = build_method("sparsegpt", {}, "2:4")
    sparsegpt.prune(permuted, ChannelStats.of(x[:, order], gram=True), Target(0.5, (2, 4)))
    outcome = sparsegpt.prune(lin, ChannelStats.of(x, gram=True), Target(0.5, (2, 4), reallocation=True, lsa=lsa))
    assert torch.equal(outcome.permutation.long(), order)
    assert torch.allclose(lin.weight.detach()[:, order], permuted.weight.detach(), atol=1e-5)
    assert ((lin.weight.detach()[:, order].reshape(16, -1, 4) == 0).sum(-1) == 2).all()
    assert ((lin.weight.detach().reshape(16, -1, 4) == 0).sum(-1) != 2).any()  # not N:M in the model's own order


@pytest.mark.parametrize("arch", [*ARCHS, "llama+mlp_bias"])
def test_absorbed_permutation_keeps_the_models_function(arch: str) -> None:
    if arch == "llama+mlp_bias":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, mlp_bias=True)).eval()
    else:
        model = tiny_model(arch)
    with torch.no_grad():  # biases start at zero: random ones show whether the producers' biases move with their rows
        for lin in model.modules():
            if isinstance(lin, nn.Linear) and lin.bias is not None:
                lin.bias.normal_(generator=torch.Generator().manual_seed(lin.out_features))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and producers(model, n) is not None]
    assert len(names) == 3 and all(n.endswith(("down_proj", "fc2")) for n in names)  # one MLP per decoder layer
    for i, name in enumerate(names):
        w = model.get_submodule(name).weight.detach().clone()
        order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(i))
        assert absorb(model, name, order) in (["gate_proj", "up_proj"], ["fc1"])
        assert torch.equal(model.get_submodule(name).weight.detach(), w[:, order])
    outs = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and head_blocks(model, n) is not None]
    assert len(outs) == 3 and all(n.endswith(("o_proj", "out_proj")) for n in outs)  # one attention per decoder layer
    for i, name in enumerate(outs):
        width, share = head_blocks(model, name)
        assert (width, share) == ((16, 1) if arch == "opt" else (16, 2))  # 4 heads of 16, and 2 key/value heads but OPT
        w = model.get_submodule(name).weight.detach().clone()
        g = torch.Generator().manual_seed(i)
        within = torch.stack([torch.randperm(width, generator=g) for _ in range(4 // share)]).repeat_interleave(share, 0)
        order = (within + torch.arange(0, 64, width)[:, None]).reshape(-1)  # heads that share values share an order
        assert absorb(model, name, order) == ["v_proj"]
        assert torch.equal(model.get_submodule(name).weight.detach(), w[:, order])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_nothing_is_absorbed_where_the_inputs_are_not_an_elementwise_map_of_sibling_rows() -> None:
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert absorb(model, "model.layers.0.self_attn.q_proj", torch.arange(64).flip(0)) is None
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)
    fused = nn.Module()  # Phi-3's MLP: one gate_up_proj, no gate_proj or up_proj of the down projection's width
    fused.gate_up_proj, fused.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)
    assert producers(fused, "down_proj") is None
    wide = nn.Module()  # gate and up whose rows are not the down projection's inputs one for one
    wide.gate_proj, wide.up_proj, wide.down_proj = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(16, 8)
    assert producers(wide, "down_proj") is None
    wide.gate_proj, wide.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
    assert producers(wide, "down_proj") == [wide.gate_proj, wide.up_proj]
    # BitNet normalises act(gate) * up over its channels, with a weight per channel, before down_proj
    bitnet = AutoModelForCausalLM.from_config(BitNetConfig(**{**COMMON, "num_hidden_layers": 1}))
    assert producers(bitnet, "model.layers.0.mlp.down_proj") is None
    assert producers(model, "model.layers.0.mlp.down_proj") is not None
    model.model.layers[0].mlp.register_buffer("channel_scale", torch.ones(128))  # any per-channel tensor beside them
    assert producers(model, "model.layers.0.mlp.down_proj") is None
    # an output projection takes orders within heads, the same for heads that share values, and nothing else
    o_proj = "model.layers.0.self_attn.o_proj"
    o = model.get_submodule(o_proj).weight.detach().clone()
    for order in (torch.arange(64).flip(0),  # channels leave their heads
                  torch.cat([torch.arange(16).flip(0), torch.arange(16, 64)])):  # heads 0 and 1 share values
        assert absorb(model, order=order, name=o_proj) is None
    assert torch.equal(model.get_submodule(o_proj).weight, o)
    assert head_blocks(model, o_proj) == (16, 2)
    model.model.layers[0].self_attn.register_buffer("value_scale", torch.ones(16))  # a head-wide tensor: a value norm?
    assert head_blocks(model, o_proj) is None


@pytest.mark.parametrize("method, realloc, lsa", [("wanda", True, False), ("wanda", "absorbed", False),
                                                 ("statprune", "absorbed", False), ("wanda", True, True)])
def test_reallocation_stores_absorbed_down_projections_n_m_with_the_same_perplexity(
        method: str, realloc: bool | str, lsa: bool, tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Absorbing changes how the weights are stored, not what the model computes: against a run that absorbs
    nothing, the same perplexity; down projections N:M as stored; other linears per ``reallocation``. statprune's
    update and energy restoration run in the stored order, before the layer absorbs the order."""
    options = {}
    def prune(out: str) -> dict:
        cfg = write_config(tmp_path / f"{out}.yaml", tiny_model_dir, text_files, tmp_path / out,
                           pruning={"method": method, "pattern": "2:4", "reallocation": realloc, "lsa": lsa, **options})
        res = CliRunner().invoke(app, ["prune", str(cfg), "-q", "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    report = prune("absorbed")
    with monkeypatch.context() as m:
        m.setattr("statprune_cli.engine.absorb", lambda model, name, order: None)
        plain = prune("plain")
    assert report["perplexity"][0]["perplexity"] == pytest.approx(plain["perplexity"][0]["perplexity"], rel=1e-5)
    weights = load_file(str(tmp_path / "absorbed" / "model.safetensors"))
    extras = tmp_path / "absorbed" / "pruning_extras.safetensors"
    perms = load_file(str(extras)) if extras.is_file() else {}
    for key, w in weights.items():
        if not key.endswith("proj.weight"):
            continue
        name = key[: -len(".weight")]
        stored_nm = bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all())
        assert stored_nm == (name.endswith("down_proj") or realloc == "absorbed"), name
        assert (f"{name}.channel_permutation" in perms) == (not stored_nm), name
    down = report["layers"][0]["linears"]["model.layers.0.mlp.down_proj"]
    assert down["channel_permutation"].startswith("absorbed") and "reallocation_kept_score_gain" in down
    o = report["layers"][0]["linears"]["model.layers.0.self_attn.o_proj"]
    assert "reallocation_kept_score_gain" in o  # within heads where absorbed, across them otherwise
    assert (o.get("channel_permutation") == "absorbed: columns stored in reallocation order, v_proj rows to match") == (
        realloc == "absorbed")
    q = report["layers"][0]["linears"]["model.layers.0.self_attn.q_proj"]
    assert ("reallocation_kept_score_gain" in q) == (realloc is True)
    assert report["reallocation"] == realloc
    assert report["pattern_label"].endswith(" (LSA-refined)") == lsa
    assert not any(n.startswith("reallocation absorbed") for n in report["notes"])


def test_absorbed_reallocation_says_so_where_no_mlp_can_take_it(tmp_path: Path, text_files: dict[str, Path]) -> None:
    """Phi-3 fuses gate and up into one linear: statprune's 2:4 default (absorbed) reallocates nothing there, and
    the report says why instead of implying a reallocation."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny-phi3"
    AutoModelForCausalLM.from_config(Phi3Config(**{**COMMON, "pad_token_id": 0})).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = write_config(tmp_path / "phi3.yaml", folder, text_files, tmp_path / "out",
                       pruning={"method": "statprune", "pattern": "2:4"})
    res = CliRunner().invoke(app, ["prune", str(cfg), "-q", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["reallocation"] == "absorbed"
    assert any(n.startswith("reallocation absorbed: no MLP") for n in report["notes"])
    assert not any("channel_permutation" in r for layer in report["layers"] for r in layer["linears"].values())


def test_owl_layer_sparsities_average_to_the_target() -> None:
    ratios = [0.01, 0.05, 0.02, 0.10, 0.03]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-15)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # more outliers: more weights kept
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_counts_scores_above_m_times_the_layer_mean() -> None:
    a, xa = correlated_layer(rows=4, cols=8, seed=1)
    b, _ = correlated_layer(rows=4, cols=8, seed=2)
    stats = {"a": ChannelStats.of(xa), "b": ChannelStats.of(xa)}
    norms = xa.double().norm(dim=0).float()
    flat = torch.cat([(a.weight.abs() * norms).flatten(), (b.weight.abs() * norms).flatten()]).detach()
    expected = float((flat > 2.0 * flat.mean()).float().mean())
    assert outlier_ratio({"a": a, "b": b}, stats, 2.0) == pytest.approx(expected)


runner = CliRunner()


@pytest.mark.parametrize("method", ["sparsegpt", "ria", "magnitude"])
def test_owl_profile_through_the_cli(method: str, tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       pruning={"method": method, "sparsity": 0.6, "profile": "owl", "owl": {"m": 2.0, "lam": 0.1}})
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    targets = report["layer_target_sparsity"]
    assert len(targets) == 3 and sum(targets) / 3 == pytest.approx(0.6, abs=1e-12) and len(set(targets)) > 1
    for row, t in zip(report["layers"], targets):
        assert row["target_sparsity"] == pytest.approx(t)
        assert row["sparsity"] == pytest.approx(t, abs=0.02)  # int(cols * s) per row or block


def test_sparsegpt_one_shot_needs_a_hessian_in_the_stats(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")
    stats = tmp_path / "wanda.stats.safetensors"
    assert runner.invoke(app, ["calibrate", str(cfg), "-q", "-o", str(stats)]).exit_code == 0
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--stats", str(stats), "--set", "pruning.method=sparsegpt"])
    assert res.exit_code == 2 and "has no input Hessian" in res.stderr and "pruning.method: sparsegpt" in res.stderr
    stats2 = tmp_path / "sgpt.stats.safetensors"
    assert runner.invoke(app, ["calibrate", str(cfg), "-q", "-o", str(stats2), "--set", "pruning.method=sparsegpt"]).exit_code == 0
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json", "--stats", str(stats2), "--set", "pruning.method=sparsegpt"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method,m,expected", [("wanda", None, "M 5,"), ("statprune", None, "M 7,"), ("magnitude", None, "M 7,"),
                                             ("statprune", 3.0, "M 3,")])
def test_owl_threshold_is_the_methods_unless_set(method: str, m: float | None, expected: str, tmp_path: Path,
                                                 tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    owl = {"lam": 0.1} if m is None else {"m": m, "lam": 0.1}
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       pruning={"method": method, "sparsity": 0.7, "profile": "owl", "owl": owl})
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert [n for n in json.loads(res.stdout)["notes"] if n.startswith(f"OWL layer sparsities ({expected} lambda 0.1)")]


@pytest.mark.parametrize("method,pattern,setting,expected,lsa,residual", [
    ("statprune", "2:4", {}, "absorbed", True, True), ("statprune", "4:8", {}, "absorbed", True, True),
    ("statprune", "2:4", {"reallocation": False}, False, True, True),
    ("statprune", "2:4", {"reallocation": False, "residual_permutation": False}, False, False, False),
    ("statprune", "2:4", {"lsa": False}, "absorbed", False, True),
    ("statprune", "4:8", {"reallocation": True, "residual_permutation": False}, True, True, False),
    ("wanda", "2:4", {}, False, False, False), ("wanda", "2:4", {"reallocation": "absorbed"}, "absorbed", False, False),
    ("wanda", "4:8", {"residual_permutation": True}, False, False, True)])
def test_reallocation_lsa_and_residual_permutation_are_the_methods_unless_set(
        method: str, pattern: str, setting: dict, expected: bool | str, lsa: bool, residual: bool, tmp_path: Path,
        tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    report = prune_report(tmp_path, tiny_model_dir, text_files, method=method, pattern=pattern, **setting)
    assert (report["reallocation"], report["lsa"], report["residual_permutation"]) == (expected, lsa, residual)
    down = report["layers"][0]["linears"]["model.layers.0.mlp.down_proj"]
    assert ("reallocation_kept_score_gain" in down) == bool(expected)
    assert any(n.startswith("residual stream permuted") for n in report["notes"]) == residual
    where = {True: ", channel reallocation", "absorbed": ", channel reallocation where absorbed"}.get(expected, "")
    where += ", residual stream permuted" if residual else ""
    assert report["pattern_label"] == pattern + where + (" (LSA-refined)" if lsa else "")
