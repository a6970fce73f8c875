"""One permutation of the residual stream (``pruning.residual_permutation``): the function is kept on every
architecture, unknown ones are refused, the order is chosen on the readers' scores, and a run with it equals a run
on a checkpoint permuted beforehand, in memory and streamed, with every stored weight N:M."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, COMMON, tiny_model, tiny_tokenizer, write_config
from test_masks import kept_score
from test_streaming import assert_same_weights, prune, run_cli, tensors
from torch import nn
from transformers import AutoModelForCausalLM, Phi3Config

from statprune_cli import prepasses
from statprune_cli.config import load_config
from statprune_cli.engine import Collect, InMemoryLayers, LayerwiseEngine, Selection
from statprune_cli.errors import ConfigError
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import check_against_model
from statprune_cli.permute import ResidualPlan, residual_order, residual_plan
from statprune_cli.sketch import auto_every
from statprune_cli.ui import UI


def plan_of(model: nn.Module) -> ResidualPlan:
    plan = residual_plan(model, find_decoder_layers(model)[0], model.config.hidden_size)
    assert isinstance(plan, ResidualPlan), plan
    return plan


@pytest.mark.parametrize("arch", ARCHS)
def test_permuting_the_residual_stream_keeps_the_function(arch: str) -> None:
    """Random norm weights and biases: a tensor the plan missed would change the logits."""
    model = tiny_model(arch)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1:
                t.normal_(1.0 if name.endswith("weight") else 0.0, 0.3, generator=torch.Generator().manual_seed(t.numel()))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    plan = plan_of(model)
    readers = {"opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "fc1"]}.get(
        arch, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"])
    assert sorted(plan.readers) == sorted(readers)
    q = model.get_submodule(f"{find_decoder_layers(model)[0]}.1.{readers[0]}").weight.detach().clone()
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    InMemoryLayers().permute_residual(model, plan, order)
    assert torch.equal(model.get_submodule(f"{find_decoder_layers(model)[0]}.1.{readers[0]}").weight.detach(), q[:, order])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-4)


def test_an_architecture_with_fused_projections_is_not_permuted_and_asking_for_it_is_a_config_error(
        tmp_path: Path, text_files: dict[str, Path]) -> None:
    config = Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    why = residual_plan(model, find_decoder_layers(model)[0], 64)
    assert why == "model.layers.0.self_attn.qkv_proj is not a known reader or writer of the residual stream"
    cfg = load_config(write_config(tmp_path / "run.yaml", tmp_path, text_files, tmp_path / "out",
                                   pruning={"method": "wanda", "pattern": "2:4", "residual_permutation": True}))
    with pytest.raises(ConfigError, match=r"pruning.residual_permutation: not known for this architecture: .*qkv_proj"):
        check_against_model(cfg, config)


@pytest.mark.parametrize("pruning, message", [
    ({"pattern": "unstructured"}, "spreads N:M groups; pattern unstructured has none"),
    ({"method": "magnitude"}, "is chosen on calibration statistics, which magnitude does not collect"),
])
def test_residual_permutation_needs_n_m_and_statistics(tmp_path: Path, text_files: dict[str, Path], pruning: dict,
                                                       message: str) -> None:
    path = write_config(tmp_path / "run.yaml", tmp_path, text_files, tmp_path / "out",
                        pruning={"method": "wanda", "pattern": "2:4", "residual_permutation": True, **pruning})
    with pytest.raises(ConfigError, match=f"pruning.residual_permutation: {message}"):
        load_config(path)


def test_the_order_spreads_the_readers_important_channels_and_lsa_keeps_more() -> None:
    """Channels 0-15 carry most score in every reader: stored, they crowd four groups; the order deals them out."""
    g = torch.Generator().manual_seed(0)
    readers = [torch.rand(rows, 64, generator=g) * torch.where(torch.arange(64) < 16, 10.0, 1.0) for rows in (48, 96)]
    stacked = torch.cat([r / r.mean() for r in readers])
    order, rows, gain = residual_order(iter(readers), 144, 2, 4, lsa=False)
    assert sorted(order.tolist()) == list(range(64)) and rows == 144
    assert gain == pytest.approx(kept_score(stacked, order, 2, 4) / kept_score(stacked, torch.arange(64), 2, 4) - 1, rel=1e-5)
    assert gain > 0.05
    assert all(len(set(group) & set(range(16))) == 1 for group in order.reshape(-1, 4).tolist())
    refined, _, refined_gain = residual_order(iter(readers), 144, 2, 4, lsa=True)
    assert refined_gain >= gain
    _, sampled, _ = residual_order(iter(readers), 144, 2, 4, lsa=False, rows=50)
    assert sampled == 16 + 32  # every third row of each reader: at most 50


def test_a_run_with_it_equals_a_run_on_the_checkpoint_permuted_beforehand(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = []
    order_of = prepasses.residual_order
    monkeypatch.setattr(prepasses, "residual_order", lambda *a, **k: chosen.append(order_of(*a, **k)) or chosen[-1])
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "mem",
                       pruning={"method": "statprune", "pattern": "2:4"})
    mem = prune(cfg, "--set", "runtime.streaming=false")
    streamed = prune(cfg, "--set", "runtime.streaming=true", "-o", str(tmp_path / "stream"))
    assert len(chosen) == 2 and torch.equal(chosen[0][0], chosen[1][0])
    order = chosen[0][0]
    assert not torch.equal(order, torch.arange(64))
    assert_same_weights(tmp_path / "mem", tmp_path / "stream")
    assert streamed["perplexity"] == mem["perplexity"]
    assert mem["residual_permutation"] is True and mem["lsa"] is True
    assert mem["pattern_label"] == "2:4, channel reallocation where absorbed, residual stream permuted (LSA-refined)"
    first = "residual stream permuted for N:M (64 channels, heuristic order refined by LSA"
    note = next(n for n in mem["notes"] if n.startswith(first))
    # the step's cost in its three parts, for a user weighing it against its gain
    assert re.search(r"; [0-9.]+ s for the statistics \(a dense pass unless shared\), [0-9.]+ s choosing the order, "
                     r"[0-9.]+ s permuting the weights$", note), note
    for name, w in tensors(tmp_path / "mem").items():  # every linear is N:M as stored: nothing to gather at run time
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
    assert not (tmp_path / "mem" / "pruning_extras.safetensors").exists()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    InMemoryLayers().permute_residual(model, plan_of(model), order)
    model.save_pretrained(tmp_path / "permuted")
    tiny_tokenizer().save_pretrained(tmp_path / "permuted")
    reference = prune(cfg, "--set", "pruning.residual_permutation=false", "--set", f"model.name_or_path={tmp_path / 'permuted'}",
                      "-o", str(tmp_path / "reference"))
    assert_same_weights(tmp_path / "mem", tmp_path / "reference")
    assert reference["perplexity"] == mem["perplexity"] and reference["residual_permutation"] is False
    report = json.loads((tmp_path / "mem" / "report.json").read_text())
    assert report["residual_permutation"] is True


def test_a_streamed_run_resumed_after_sigkill_permutes_the_same_way(tmp_path: Path, tiny_model_dir: Path,
                                                                    text_files: dict[str, Path]) -> None:
    """The resumed process chooses the order again (the same dense pass): its layers must meet the saved activations
    and the layers already written in the same residual order."""
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       pruning={"method": "statprune", "pattern": "2:4"}, runtime={"device": "cpu", "streaming": True})
    whole = run_cli(cfg, "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert run_cli(cfg, env={"STATPRUNE_TEST_KILL_AFTER_LAYER": "1"}).returncode == -9
    resumed = run_cli(cfg, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "whole", tmp_path / "out")
    report = json.loads(resumed.stdout)
    assert report["residual_permutation"] is True
    assert report["perplexity"] == json.loads((tmp_path / "whole" / "report.json").read_text())["perplexity"]


def test_the_dense_pass_for_the_order_reads_only_the_windows_its_token_budget_needs(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    """A pass costs in proportion to its tokens: the order's pass stops at ``RESIDUAL_TOKENS``, and a pass over every
    window, once made, serves every budget (and the other way round never)."""
    model = tiny_model("llama")
    engine = LayerwiseEngine(model, torch.device("cpu"), offload_activations=False, ui=UI(quiet=True))
    batches = list(torch.randint(3, 128, (6, 1, 32), generator=torch.Generator().manual_seed(0)))
    dense = prepasses.DenseStats(Selection(), batches, UI(quiet=True))
    q = f"{engine.layers_name}.0.self_attn.q_proj"
    assert dense.get(engine, Collect(), tokens=70)[q].count == 96  # three windows of 32 reach 70
    assert dense.get(engine, Collect(), tokens=64)[q].count == 96  # a larger budget's statistics serve a smaller one
    full = dense.get(engine, Collect())
    assert full[q].count == 192
    assert dense.get(engine, Collect(), tokens=70) is full
    assert dense.get(engine, Collect(), tokens=10_000) is full
    pairs = list(torch.cat(batches).split(2))  # batches of two windows: the last one needed is cut to what it must give
    assert [len(b) for b in prepasses.first_windows(pairs, 70)] == [2, 1]
    assert [len(b) for b in prepasses.first_windows(pairs, 64)] == [2]
    assert torch.equal(torch.cat(prepasses.first_windows(pairs, 100)), torch.cat(batches[:4]))


def test_dense_sketch_statistics_are_cached_under_the_stride_an_unset_one_resolves_to(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    """An unset sketch stride is the automatic one: asking for it explicitly afterwards reuses the pass, another
    stride makes a new one."""
    model = tiny_model("llama")
    engine = LayerwiseEngine(model, torch.device("cpu"), offload_activations=False, ui=UI(quiet=True))
    batches = list(torch.randint(3, 128, (2, 1, 32), generator=torch.Generator().manual_seed(0)))
    dense = prepasses.DenseStats(Selection(), batches, UI(quiet=True))
    auto = dense.get(engine, Collect(sketch=8))
    assert auto_every(64) == 1
    assert dense.get(engine, Collect(sketch=8, sketch_every=1)) is auto
    assert dense.get(engine, Collect(sketch=8, sketch_every=2)) is not auto
