"""Streaming from the checkpoint: same output as in memory, resume after SIGKILL, disk activations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, job, tiny_model, write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.config import ModelConfig
from statprune_cli.engine import Collect, LayerwiseEngine, Selection
from statprune_cli.layers import find_decoder_layers
from statprune_cli.methods import Target, build_method
from statprune_cli.streaming import Checkpoint, StreamedLayers, load_skeleton
from statprune_cli.ui import UI

runner = CliRunner()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def prune(cfg: Path, *args: str) -> dict:
    res = runner.invoke(app, ["prune", str(cfg), "-q", "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("method,options", [("wanda", {}), ("sparsegpt", {}), ("statprune", {"energy_targets": ["re:.*"]})])
def test_streaming_output_equals_in_memory(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], method: str,
                                           options: dict) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "mem",
                       pruning={"method": method, "options": options})
    mem = prune(cfg, "--set", "runtime.streaming=false")
    streamed = prune(cfg, "--set", "runtime.streaming=true", "-o", str(tmp_path / "stream"))
    assert not mem["streaming"] and streamed["streaming"]
    assert_same_weights(tmp_path / "mem", tmp_path / "stream")
    assert streamed["perplexity"][0]["perplexity"] == mem["perplexity"][0]["perplexity"]
    assert streamed["sparsity"] == mem["sparsity"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    ids = torch.randint(3, 100, (2, 16))
    assert torch.equal(a(ids).logits, b(ids).logits)
    leftovers = {p.name for p in (tmp_path / "stream").iterdir()} - {p.name for p in (tmp_path / "mem").iterdir()}
    assert leftovers <= {"model.safetensors.index.json", *(p.name for p in (tmp_path / "stream").glob("model-*.safetensors"))}
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("streaming", [False, True])
def test_disk_activations_give_the_same_output(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path],
                                               streaming: bool) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "cpu",
                       runtime={"device": "cpu", "streaming": streaming})
    a = prune(cfg, "--set", "runtime.offload_activations=cpu")
    b = prune(cfg, "--set", "runtime.offload_activations=disk", "-o", str(tmp_path / "disk"))
    assert_same_weights(tmp_path / "cpu", tmp_path / "disk")
    assert a["perplexity"] == b["perplexity"]
    assert not [p for p in tmp_path.iterdir() if "activations" in p.name]
    assert not list((tmp_path / "disk").glob("activations-*"))


def run_cli(cfg: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "statprune_cli", "prune", str(cfg), "-q", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_resume_after_sigkill_is_bit_identical_and_a_changed_config_is_refused(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       runtime={"device": "cpu", "streaming": True})
    whole = run_cli(cfg, "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli(cfg, env={"STATPRUNE_TEST_KILL_AFTER_LAYER": "1"})
    assert killed.returncode == -9
    partial = tmp_path / ".out.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["next_layer"] == 2 and not (tmp_path / "out").exists()
    refused = run_cli(cfg, "--set", "pruning.sparsity=0.6")
    assert refused.returncode == 2
    assert "holds a partial run of another config (pruning.sparsity: 0.5 -> 0.6)" in refused.stderr
    # a partial run from a statprune whose defaults differed (here its record says reallocation was absorbed)
    record = json.loads((partial / "progress.json").read_text())
    assert record["config"]["plan"]["reallocation"] is False
    other = {**record, "config": {**record["config"], "plan": {**record["config"]["plan"], "reallocation": "absorbed"}}}
    (partial / "progress.json").write_text(json.dumps(other))
    refused = run_cli(cfg)
    assert refused.returncode == 2
    assert "(plan.reallocation: 'absorbed' -> False); it was started by another statprune version" in refused.stderr
    (partial / "progress.json").write_text(json.dumps(record))
    resumed = run_cli(cfg, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at layer 2 of 3" not in resumed.stderr  # -q: no log lines
    assert_same_weights(tmp_path / "whole", tmp_path / "out")
    report = json.loads(resumed.stdout)
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2]
    assert report["perplexity"] == json.loads((tmp_path / "whole" / "report.json").read_text())["perplexity"]
    assert not partial.exists() and not list((tmp_path / "out").glob("progress.json"))
    assert not list((tmp_path / "out").glob("inputs-*"))


def test_streaming_a_gguf_checkpoint_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    (tiny_model_dir / "m.gguf").write_bytes(b"GGUF")
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       model={"name_or_path": str(tiny_model_dir), "gguf_file": "m.gguf"}, runtime={"streaming": True})
    res = runner.invoke(app, ["prune", str(cfg), "-q"])
    assert res.exit_code == 2
    assert "runtime.streaming: a GGUF checkpoint is dequantized whole on load" in res.stderr


def test_calibrate_and_eval_stream_the_same_numbers(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")
    results = {}
    for streaming in ("false", "true"):
        stats = tmp_path / f"{streaming}.stats.safetensors"
        res = runner.invoke(app, ["calibrate", str(cfg), "-q", "-o", str(stats), "--set", f"runtime.streaming={streaming}"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["eval-ppl", str(cfg), "-q", "--json", "--set", f"runtime.streaming={streaming}"])
        assert res.exit_code == 0, res.output
        results[streaming] = (load_file(str(stats)), json.loads(res.stdout))
    (a, ppl_a), (b, ppl_b) = results.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ppl_a == ppl_b


def test_ria_channel_permutations_are_saved_and_survive_a_resume(tmp_path: Path, tiny_model_dir: Path,
                                                                  text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       pruning={"method": "ria", "pattern": "2:4", "reallocation": True},
                       runtime={"device": "cpu", "streaming": True})
    mem = run_cli(cfg, "--set", "runtime.streaming=false", "-o", str(tmp_path / "mem"))
    assert mem.returncode == 0, mem.stderr
    assert run_cli(cfg, env={"STATPRUNE_TEST_KILL_AFTER_LAYER": "1"}).returncode == -9
    assert list((tmp_path / ".out.partial").glob("extras-*.safetensors"))
    resumed = run_cli(cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "mem", tmp_path / "out")
    perms = load_file(str(tmp_path / "out" / "pruning_extras.safetensors"))
    weights = tensors(tmp_path / "out")
    linears = [k[: -len(".weight")] for k in weights if k.startswith("model.layers.") and k.endswith("proj.weight")]
    absorbed = [n for n in linears if n.endswith("down_proj")]  # stored in their permuted order (permute.py)
    assert len(absorbed) == 3 and sorted(perms) == sorted(f"{n}.channel_permutation" for n in linears if n not in absorbed)
    for name in absorbed:
        w = weights[f"{name}.weight"]
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
    for name in set(linears) - set(absorbed):
        w, perm = weights[f"{name}.weight"], perms[f"{name}.channel_permutation"].long()
        assert sorted(perm.tolist()) == list(range(w.shape[1]))
        assert ((w[:, perm].reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name  # N:M in the saved order
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) != 2).any(), name  # and not in the stored one
    assert not list((tmp_path / "out").glob("extras-*"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["extras_file"] == "pruning_extras.safetensors"
    assert report["reallocation"] is True and report["pattern_label"] == "2:4, channel reallocation"


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_layers_run_without_the_embeddings_and_give_the_in_memory_statistics(tmp_path: Path, arch: str) -> None:
    """While the layers run, nothing outside them is in memory (tied heads and OPT's learned positions included);
    the statistics equal an in-memory run's, and the weights come back whole for the logits."""
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    checkpoint = Checkpoint(tmp_path)
    skeleton = load_skeleton(ModelConfig(str(tmp_path)), model.config, checkpoint)
    layers_name = find_decoder_layers(skeleton)[0]
    io = StreamedLayers(checkpoint, layers_name, torch.float32)
    outside = [n for n in skeleton.state_dict(keep_vars=True) if not n.startswith(layers_name + ".")]  # tied names too
    in_memory_while_layers_run = []
    batches = [torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def on_layer_done(i, layer, hidden, results) -> None:
        state = skeleton.state_dict(keep_vars=True)
        in_memory_while_layers_run.extend(n for n in outside if not state[n].is_meta)

    streamed = LayerwiseEngine(skeleton, torch.device("cpu"), False, UI(quiet=True), io=io)
    stats = streamed.run(job(build_method("wanda", {}), Target(0.0)), batches, on_layer_done=on_layer_done).stats
    assert outside and in_memory_while_layers_run == []
    reference = LayerwiseEngine(model, torch.device("cpu"), False, UI(quiet=True))
    expected = reference.statistics(batches, Selection(), Collect())
    assert stats.keys() == expected.keys()
    assert all(torch.equal(stats[k].sumsq, expected[k].sumsq) for k in stats)
    final = streamed.hidden_states(batches[:1])  # capture reads them back
    logits = streamed.logits(batches[0], final[0])
    assert torch.allclose(logits, model(batches[0]).logits, atol=1e-5)
