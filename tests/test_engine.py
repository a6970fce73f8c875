"""The layer-wise engine on tiny random models of every supported architecture."""

from pathlib import Path

import pytest
import torch
from conftest import ARCHS, job, tiny_model
from transformers import AutoModelForCausalLM

from statprune_cli import perplexity
from statprune_cli.engine import Activations, Collect, LayerwiseEngine, Selection
from statprune_cli.layers import find_decoder_layers, target_linears
from statprune_cli.methods import Target, build_method
from statprune_cli.stats import ChannelStats
from statprune_cli.ui import UI

SEQ = 24  # longer than the tiny models' sliding window (8), so sliding and global layers differ


def windows(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def engine(model) -> LayerwiseEngine:
    return LayerwiseEngine(model, torch.device("cpu"), offload_activations=True, ui=UI(quiet=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_forward_equals_full_forward(arch: str) -> None:
    model = tiny_model(arch)
    ids = windows()
    _, layers = find_decoder_layers(model)
    seen = []
    hook = layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    eng = engine(model)
    batches = list(ids.split(4))  # uneven last batch: arguments are captured per batch size
    final = eng.hidden_states(batches)
    assert torch.equal(torch.cat(final), seen[0])
    assert torch.equal(torch.cat([eng.logits(b, h) for b, h in zip(batches, final)]), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_nll_in_blocks_of_positions_equals_the_models_own_loss(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits made a block of positions at a time (7 here: blocks that do not divide the window) lose nothing."""
    monkeypatch.setattr(perplexity, "LOGIT_BLOCK", 7)
    model = tiny_model(arch)
    ids = windows(5)
    with torch.no_grad():  # transformers' mean next-token loss per window (Gemma's softcapping included)
        ref = sum(float(model(w[None], labels=w[None]).loss) * (SEQ - 1) for w in ids)
    nll, count = perplexity.window_nll(engine(model), ids, batch_size=2)
    assert count == 5 * (SEQ - 1)
    assert nll == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_with_zero_sparsity_changes_nothing(arch: str) -> None:
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = engine(model).run(job(build_method("wanda", {}), Target(0.0), ignore=["lm_head"]), list(windows().split(3)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(res.layers) == model.config.num_hidden_layers
    assert all(r.zeros == 0 for layer in res.layers for r in layer.linears.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_prunes_every_target_row(arch: str) -> None:
    model = tiny_model(arch)
    res = engine(model).run(job(build_method("statprune", {}), Target(0.5), ignore=["lm_head"]), list(windows().split(3)))
    name, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        lins = target_linears(layer, f"{name}.{i}", ["Linear"], [])
        assert set(lins) == set(res.layers[i].linears)
        for lin in lins.values():
            assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()


def test_collected_stats_equal_the_layer_inputs() -> None:
    model = tiny_model("llama")
    ids = windows()
    _, layers = find_decoder_layers(model)
    seen = {}
    hooks = [layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("down", a[0])),
             layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("q", a[0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    res = engine(model).statistics([ids], Selection(), Collect())
    for key, name in (("down", "model.layers.1.mlp.down_proj"), ("q", "model.layers.1.self_attn.q_proj")):
        ref = ChannelStats.of(seen[key])
        got = res[name]
        assert got.count == ids.numel()
        assert torch.allclose(got.sumsq, ref.sumsq, rtol=1e-6) and torch.allclose(got.sum, ref.sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channel_stats_of_a_batch_equal_the_float64_formulas(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("statprune_cli.stats.CHUNK_ELEMENTS", 3 * 40 + 7)  # several chunks, the last one short
    x = (torch.randn(2, 25, 40, dtype=torch.float64) * torch.linspace(0.01, 30, 40)).to(dtype)
    before = x.clone()
    got = ChannelStats.of(x)
    ref = x.reshape(-1, 40).double()
    assert got.count == 50
    assert torch.allclose(got.sum, ref.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.sumsq, (ref * ref).sum(0), rtol=1e-12)
    assert torch.allclose(got.sumabs, ref.abs().sum(0), rtol=1e-12)
    assert torch.equal(x, before)  # the in-place steps work on a copy, float64 inputs too
    sliced = ChannelStats.of(x[:, 3:])  # the sink-free view: contiguous per window only
    ref = x[:, 3:].reshape(-1, 40).double()
    assert sliced.count == 44
    assert torch.allclose(sliced.sumsq, (ref * ref).sum(0), rtol=1e-12)
    assert torch.allclose(sliced.sum, ref.sum(0), rtol=1e-12, atol=1e-12)


def test_skip_first_tokens_leaves_the_first_positions_out() -> None:
    model = tiny_model("llama")
    ids = windows()
    res = engine(model).statistics([ids], Selection(("re:.*q_proj",)), Collect(skip_first=2))
    assert all(s.count == ids.shape[0] * (SEQ - 2) for s in res.values())
    assert set(res) == {f"model.layers.{i}.self_attn.q_proj" for i in range(3)}


def test_sequential_uses_pruned_outputs() -> None:
    ids = list(windows().split(3))
    runs = {}
    for seq in (True, False):
        model = tiny_model("llama")
        engine(model).run(job(build_method("wanda", {}), Target(0.5), sequential=seq), ids)
        runs[seq] = model.model.layers[2].mlp.down_proj.weight.clone()
    assert not torch.equal(runs[True], runs[False])


def test_one_shot_from_saved_stats_matches_dense_activation_run() -> None:
    ids = list(windows().split(3))
    dense = tiny_model("llama")
    stats = engine(dense).statistics(ids, Selection(), Collect())
    a, b = tiny_model("llama"), tiny_model("llama")
    engine(a).run(job(build_method("wanda", {}), Target(0.5), stats=stats), None)
    engine(b).run(job(build_method("wanda", {}), Target(0.5), sequential=False), ids)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_compensated_model_reloads_in_transformers(tmp_path: Path) -> None:
    model = tiny_model("llama")
    ids = windows()
    dense = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    engine(model).run(job(build_method("statprune", {}, "2:4"), Target(0.5, (2, 4))), [ids])
    pruned = model.model.layers[0].mlp.down_proj.weight.detach()
    assert not torch.equal(pruned, dense.masked_fill(pruned == 0, 0.0))  # the update and the energy moved kept weights
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_non_finite_weights_stop_with_the_layer_name() -> None:
    from statprune_cli.errors import PruneError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PruneError, match=r"model\.layers\.1\.mlp\.up_proj"):
        engine(model).run(job(build_method("magnitude", {}), Target(0.5)), None)


def test_non_finite_statistics_stop_with_the_layer_name() -> None:
    from statprune_cli.errors import PruneError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(PruneError, match=r"non-finite input statistics.*model\.layers\.0\.self_attn\.q_proj"):
        engine(model).run(job(build_method("wanda", {}), Target(0.5)), [windows()])


GROUPS = {
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_input_groups_follow_the_forward(arch: str) -> None:
    from statprune_cli.engine import input_groups

    model = tiny_model(arch)
    eng = engine(model)
    hidden, args = eng.capture([windows()])
    linears = eng.linears(1, Selection())
    groups = input_groups(eng.layers[1], linears, hidden[0], args[1], torch.device("cpu"))
    short = [[n.split(".layers.1.")[1] for n in g] for g in groups]
    assert short == GROUPS.get(arch, GROUPS["llama"])


def input_stats_of_full_forward(model, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum of squares per channel of every decoder linear's input, from plain forwards of the whole model."""
    sums: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, inp, n=n: sums.__setitem__(
        n, sums.get(n, 0) + inp[0].double().pow(2).reshape(-1, inp[0].shape[-1]).sum(0)))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for x in ids:
            model(x)
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_true_sequential_calibrates_each_linear_on_the_pruned_model_upstream(arch: str) -> None:
    """With true_sequential every linear's statistics are those of its input in the final pruned model
    (nothing upstream changes after it is pruned, and it is pruned after everything upstream);
    layer by layer only, the linears after the first group see the dense layer's inputs."""
    ids = list(windows().split(3))
    orders = []
    for true_sequential in (True, False):
        model = tiny_model(arch)
        res = engine(model).run(job(build_method("wanda", {}), Target(0.5), true_sequential=true_sequential), ids)
        final = input_stats_of_full_forward(model, ids)
        same = {n: torch.allclose(res.stats[n].sumsq, final[n], rtol=1e-5) for n in final}
        assert all(same.values()) == true_sequential, [n for n, ok in same.items() if not ok][:3]
        orders.append([list(layer.linears) for layer in res.layers])
        assert all(r.zeros == r.shape[0] * r.shape[1] // 2 for layer in res.layers for r in layer.linears.values())
    assert orders[0] == orders[1]  # the report lists a layer's linears in the same order either way


def test_true_sequential_with_disk_offload_equals_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its extra passes alternate the activation files too, without overwriting the inputs they read, and the
    passes run only for a later group's statistics store no outputs."""
    ids = list(windows().split(3))
    weights = []
    stored = []
    next_pass = Activations.next_pass
    monkeypatch.setattr(Activations, "next_pass", lambda self: stored.append(1) or next_pass(self))
    for offload in (True, "disk"):
        model = tiny_model("llama")
        LayerwiseEngine(model, torch.device("cpu"), offload, UI(quiet=True), activation_dir=tmp_path / str(offload)).run(job(build_method("wanda", {}), Target(0.5), true_sequential=True), ids)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    layers = model.config.num_hidden_layers  # per run: the capture, then per layer the pruned pass (the statistics
    assert len(stored) == 2 * (1 + layers)   # passes of a sequential run store nothing)


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_pass_stops_after_the_last_observed_linear(arch: str) -> None:
    """A sequential run's statistics pass ends each batch at its last target linear's input (the layer's last
    linear never runs there, but for the first batch that learns the layer's calls), and prunes exactly as a
    run whose passes all run whole."""
    ids = list(windows().split(2))
    weights = []
    for stop in (True, False):
        model = tiny_model(arch)
        _, layers = find_decoder_layers(model)
        last = [list(target_linears(layer, "", ["Linear"], []).values())[-1] for layer in layers]
        calls = [0] * len(layers)
        for i, lin in enumerate(last):
            lin.register_forward_hook(lambda m, a, out, i=i: calls.__setitem__(i, calls[i] + 1))
        eng = engine(model)
        if not stop:
            eng.early_stop.calls_once[type(layers[0])] = False
        eng.run(job(build_method("wanda", {}), Target(0.5)), ids)
        whole = [len(ids)] * len(layers)  # the pass of the pruned layer
        assert calls == ([len(ids) + 1] + whole[1:] if stop else [2 * len(ids)] * len(layers))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class _CallsTwice(torch.nn.Module):
    """A layer that calls ``a`` twice: its statistics pass must run whole."""

    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(self.b(self.a(x)))
        return self.a(y) if self.twice else y


@pytest.mark.parametrize("twice", [False, True])
def test_early_stop_only_where_each_linear_runs_once(twice: bool) -> None:
    from statprune_cli.engine import EarlyStop, forward_layer

    layer, stop = _CallsTwice(twice), EarlyStop()
    ran = []
    layer.c.register_forward_hook(lambda m, a, out: ran.append(1))
    for _ in range(2):  # a second pass knows the layer from the first
        with stop.watch(layer, [layer.a, layer.b]) as seen:
            hooks = [lin.register_forward_pre_hook(lambda m, inp: seen(m)) for lin in (layer.a, layer.b)]
            outputs = forward_layer(layer, [torch.ones(1, 4)] * 3, {1: ((), {})}, lambda j, t: t)
            for h in hooks:
                h.remove()
    assert stop.calls_once == {_CallsTwice: not twice}
    assert len(ran) == (6 if twice else 1) and len(outputs) == (3 if twice else 0)


def test_all_finite_sees_nan_and_inf_but_not_an_overflowing_sum() -> None:
    from statprune_cli.stats import all_finite

    big = torch.full((4,), 3e38)
    assert all_finite(big) and not torch.isfinite(big.sum())
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[2] = bad
        assert not all_finite(t)
