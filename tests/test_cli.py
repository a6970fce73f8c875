"""The command line end to end on a tiny local model: outputs, reports, exit codes and error messages."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, tiny_tokenizer, write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from statprune_cli import __version__
from statprune_cli.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def cfg(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> Path:
    return write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")


def test_version_and_help() -> None:
    assert run("--version").stdout.strip() == f"statprune {__version__}"
    top = run("--help").stdout
    for cmd in ("prune", "calibrate", "eval-ppl", "eval-zeroshot", "export"):
        assert cmd in top
        assert "Example:" in run(cmd, "--help").stdout


def test_prune_writes_a_loadable_folder_and_report(cfg: Path, tmp_path: Path) -> None:
    res = run("prune", str(cfg), "--quiet", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    out = tmp_path / "out"
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "statprune.yaml", "report.json"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert json.loads((out / "report.json").read_text())["method"] == "wanda"
    assert report["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.5)
    assert report["sparsity"]["pruned_linears"]["zeros_before"] == 0 and not report["notes"]
    assert 0 < report["sparsity"]["all_parameters"]["sparsity"] < 0.5
    assert report["perplexity"][0]["windows"] > 0 and report["perplexity"][0]["perplexity"] > 1
    assert len(report["layers"]) == 3 and "peak_rss_mib" in report["memory"]
    saved = load_file(str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], t)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_report_counts_the_checkpoints_own_zeros(tmp_path: Path, text_files: dict[str, Path]) -> None:
    """A checkpoint that already holds zeros (a dequantized one does) reads above 2:4 after a mask-only method:
    the report counts those zeros and says why."""
    d = tmp_path / "zeros"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[:, :8] = 0  # two whole 4-column groups per row
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    cfg = write_config(tmp_path / "run.yaml", d, text_files, tmp_path / "out", pruning={"method": "magnitude", "pattern": "2:4"})
    res = run("prune", str(cfg), "--quiet", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    totals = report["sparsity"]["pruned_linears"]
    assert totals["zeros_before"] == 128 * 8
    assert totals["zeros"] == totals["parameters"] // 2 + 128 * 4  # each all-zero group keeps its two extra zeros
    assert any(n.startswith("1,024 of the pruned linears'") for n in report["notes"])


@pytest.mark.parametrize("pruning", [[], ["--set", "pruning.method=statprune", "--set", "pruning.pattern=2:4"]])
def test_resolved_config_repeats_the_run_bit_for_bit(cfg: Path, tmp_path: Path, pruning: list[str]) -> None:
    """statprune.yaml is the config with the plan's decisions written in: rerun, the same plan and tensors."""
    res = run("prune", str(cfg), "-q", "--json", *pruning)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert None not in plan.values() and None not in plan["options"].values()
    written = yaml.safe_load((tmp_path / "out" / "statprune.yaml").read_text())["pruning"]
    assert written["sequential"] == plan["sequential"] and written["reallocation"] == plan["reallocation"]
    again = tmp_path / "again"
    res = run("prune", str(tmp_path / "out" / "statprune.yaml"), "-q", "--json", "--output", str(again))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plan"] == plan
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_needs_overwrite(cfg: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    res = run("prune", str(cfg), "-q")
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.stderr
    assert (tmp_path / "out" / "keep.txt").exists()
    assert run("prune", str(cfg), "-q", "--overwrite").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_calibrate_then_one_shot_prune(cfg: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats.safetensors"
    res = run("calibrate", str(cfg), "-q", "--json", "--output", str(stats))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert stats.is_file() and Path(summary["summary_file"]).is_file()
    first = summary["inputs"][0]
    assert [n.rsplit(".", 1)[-1] for n in first["linears"]] == ["q_proj", "k_proj", "v_proj"]
    assert 0 < first["top_share"] <= 1
    res = run("prune", str(cfg), "-q", "--json", "--stats", str(stats), "--set", "pruning.sparsity=0.7")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["mode"].startswith("one-shot")
    assert report["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.7, abs=0.015)  # int(cols * 0.7) per row
    bad = run("prune", str(cfg), "-q", "--overwrite", "--stats", str(tmp_path / "nope.safetensors"))
    assert bad.exit_code == 2 and "--stats: file not found" in bad.stderr


def test_one_shot_prune_takes_the_stats_files_skipped_positions(cfg: Path, tmp_path: Path) -> None:
    """Statistics cannot be recomputed without data: the file's choice of skipped positions holds, a contrary config is refused."""
    stats = tmp_path / "stats.safetensors"
    sp = ["--set", "pruning.method=statprune"]
    assert run("calibrate", str(cfg), "-q", "-o", str(stats), *sp, "--set", "pruning.pattern=2:4").exit_code == 0
    res = run("prune", str(cfg), "-q", "--json", "--stats", str(stats), *sp)  # statprune at 50% would skip 1 itself
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["calibration"]["statistics_skip_first_tokens"] == 0
    assert "skip_first_tokens: 0" in (tmp_path / "out" / "statprune.yaml").read_text()
    bad = run("prune", str(cfg), "-q", "--overwrite", "--stats", str(stats), *sp, "--set", "calibration.skip_first_tokens=1")
    assert bad.exit_code == 2
    assert "leaves out the first 0 position(s) of each window, calibration.skip_first_tokens asks for 1" in bad.stderr


def test_eval_ppl_on_a_model_folder(tiny_model_dir: Path, text_files: dict[str, Path]) -> None:
    res = run("eval-ppl", str(tiny_model_dir), "--dataset", f"text:{text_files['eval']}", "--seqlen", "32",
              "--max-tokens", "320", "--json", "-q")
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)
    assert r["windows"] == 10 and r["tokens"] == 320 and r["max_tokens"] == 320 and r["dtype"] == "float32"
    assert 50 < r["perplexity"] < 1000  # a random model over 128 tokens is near-uniform
    text = run("eval-ppl", str(tiny_model_dir), "--dataset", f"text:{text_files['eval']}", "--seqlen", "32", "-q").stdout
    assert "perplexity" in text and "seqlen 32" in text


def test_export_bitmask_and_back_to_dense(cfg: Path, tmp_path: Path) -> None:
    assert run("prune", str(cfg), "-q").exit_code == 0
    res = run("export", str(tmp_path / "out"), "--format", "bitmask", "--output", str(tmp_path / "bm"), "--json")
    assert res.exit_code == 0, res.output
    sizes = json.loads(res.stdout)
    assert sizes["output_bytes"] < sizes["dense_bytes"]
    res = run("export", str(tmp_path / "bm"), "--format", "dense", "--output", str(tmp_path / "dense"))
    assert res.exit_code == 0, res.output
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert run("export", str(tmp_path / "out"), "--format", "zip", "-o", str(tmp_path / "z")).exit_code == 2
    res = run("export", str(tmp_path / "out"), "--json")  # by default beside the source, named by the format
    assert res.exit_code == 0 and json.loads(res.stdout)["output"] == str(tmp_path / "out-bitmask"), res.output
    assert (tmp_path / "out-bitmask" / "model.bitmask.safetensors").is_file()


def test_a_failed_run_leaves_no_output(tmp_path: Path, text_files: dict[str, Path]) -> None:
    bad = tmp_path / "nan-model"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))
    model.save_pretrained(bad)
    tiny_tokenizer().save_pretrained(bad)
    cfg = write_config(tmp_path / "c.yaml", bad, text_files, tmp_path / "out")
    res = run("prune", str(cfg), "-q")
    assert res.exit_code == 1
    assert "non-finite" in res.stderr and "model.layers.0.mlp.up_proj" in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


ERRORS = [
    (["--set", "pruning.sparsity=1.5"], "pruning.sparsity: expected a number in [0, 1), got 1.5"),
    (["--set", "pruning.sparsity=half"], "pruning.sparsity: expected a number, got 'half'"),
    (["--set", "pruning.pattern=4:4"], "pruning.pattern: expected N:M with 0 < N < M"),
    (["--set", "pruning.pattern=2:5"], "pruning.pattern: M=5 does not divide in_features=64"),
    (["--set", "pruning.pattern=dense"], "pruning.pattern: expected 'unstructured' or 'N:M'"),
    (["--set", "pruning.method=obs"], "pruning.method: expected one of magnitude, ria, sparsegpt, statprune, wanda, got 'obs'"),
    (["--set", "pruning.options={gamma: 1}"], "pruning.options.gamma: unknown key"),
    (["--set", "pruning.method=statprune", "--set", "pruning.options={beta: 2}"], "pruning.options.beta: expected a number in [0, 1]"),
    (["--set", "pruning.method=statprune", "--set", "pruning.options={alpha: 2.5}"], "pruning.options.alpha: expected a number in [0, 2]"),
    (["--set", "pruning.targets=[re:.*nothing]"], "pruning.targets: matches no linear layer"),
    (["--set", "pruning.targets=['re:(']"], "pruning.targets[0]: invalid regular expression"),
    (["--set", "pruning.reallocation=true"], "pruning.reallocation: channel reallocation spreads N:M groups; pattern unstructured"),
    (["--set", "pruning.pattern=2:4", "--set", "pruning.reallocation=always"],
     "pruning.reallocation: expected true, false or absorbed, got 'always'"),
    (["--set", "pruning.lsa=true"], "pruning.lsa: refines N:M channel reallocation; pattern unstructured has none"),
    (["--set", "pruning.method=wanda", "--set", "pruning.pattern=2:4", "--set", "pruning.lsa=true"],
     "pruning.lsa: refines channel reallocation, which wanda does not do here"),
    (["--set", "pruning.method=statprune", "--set", "pruning.pattern=2:4", "--set", "pruning.reallocation=false",
      "--set", "pruning.residual_permutation=false", "--set", "pruning.lsa=true"],
     "pruning.lsa: refines channel reallocation, which statprune does not do here"),
    (["--set", "pruning.method=magnitude", "--set", "pruning.pattern=2:4", "--set", "pruning.residual_permutation=true"],
     "pruning.residual_permutation: is chosen on calibration statistics, which magnitude does not collect"),
    (["--set", "pruning.granularity=column"], "pruning.granularity: expected 'row' or 'matrix'"),
    (["--set", "calibration.seqlen=1"], "calibration.seqlen: expected an integer >= 2, got 1"),
    (["--set", "calibration.seqlen=512"], "calibration.seqlen: expected at most the model's context (256 tokens), got 512"),
    (["--set", "calibration.nsamples=0"], "calibration.nsamples: expected an integer >= 1"),
    (["--set", "calibration.dataset=jsonl:/no/such.jsonl"], "calibration.dataset: file not found: /no/such.jsonl"),
    (["--set", "calibration.dataset=jsonl:no/such.jsonl"],
     f"calibration.dataset: file not found: no/such.jsonl (relative paths are read from the working folder, {Path.cwd()})"),
    (["--set", "calibration.dataset=pile"], "calibration.dataset: expected c4, wikitext2"),
    (["--set", "calibration.nsamples=40000", "--set", "calibration.seqlen=256"], "fewer than nsamples x seqlen"),
    (["--set", "model.dtype=int8"], "model.dtype: expected one of float32, bfloat16, float16, auto"),
    (["--set", "model.name_or_path=/no/such/model"], "model.name_or_path: no folder /no/such/model (a hub id is owner/name)"),
    (["--set", "runtime.dist_timeout_minutes=0"], "runtime.dist_timeout_minutes: expected a number of minutes > 0, got 0"),
    (["--set", "pruning.method=statprune", "--set", "pruning.options={sketch_rank: -2}"],
     "pruning.options.sketch_rank: expected an integer >= 0, got -2"),
    (["--set", "pruning.method=statprune", "--set", "pruning.options={compensation: mean}"],
     "pruning.options.compensation: unknown key; expected one of: alpha, beta, energy_targets, preset, sketch_every, sketch_rank"),
    (["--set", "runtime.colour=red"], "runtime.colour: unknown key; expected one of"),
    (["--set", "eval.max_tokens=8"], "eval.max_tokens: expected at least eval.seqlen"),
    (["--set", "output.shard_size=lots"], "output.shard_size: expected a size"),
    (["--set", "runtime.offload_activations=gpu"], "runtime.offload_activations: expected true (or cpu), false or disk, got 'gpu'"),
    (["--set", "runtime.device=tpu"], "runtime.device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--set", "sparsity"], "--set: expected key.path=value"),
]


@pytest.mark.parametrize("args,message", ERRORS)
def test_bad_input_is_one_line_and_exit_2(cfg: Path, tmp_path: Path, args: list[str], message: str | None) -> None:
    res = run("prune", str(cfg), "-q", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statprune: error: ")
    if message:
        assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    res = run("prune", str(tmp_path / "none.yaml"))
    assert res.exit_code == 2 and "none.yaml: config file not found" in res.stderr
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    res = run("prune", str(tmp_path / "bad.yaml"))
    assert res.exit_code == 2 and "not valid YAML" in res.stderr
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "pruning": {"sparsity": [1]}}))
    assert "pruning.sparsity: expected a number" in run("prune", str(tmp_path / "list.yaml")).stderr


def test_eval_ppl_with_a_config_uses_its_eval_section(cfg: Path) -> None:
    res = run("eval-ppl", str(cfg), "--json", "-q")
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)
    assert r["seqlen"] == 32 and r["dataset"].startswith("text:")
    res = run("eval-ppl", str(cfg), "--json", "-q", "--seqlen", "64")
    assert json.loads(res.stdout)[0]["seqlen"] == 64


def test_sharded_output_reloads(cfg: Path, tmp_path: Path) -> None:
    res = run("prune", str(cfg), "-q", "--set", "output.shard_size=100KB")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[2].mlp.up_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_statistics_keep_every_position_unless_told(cfg: Path) -> None:
    """The first position stays in: where a model makes its attention sink there, the channels that make it fire
    there alone (docs/methods.md, scripts/sink_probe.py)."""
    for method in ("statprune", "wanda"):
        report = json.loads(run("prune", str(cfg), "-q", "--json", "--overwrite", "--set", f"pruning.method={method}").stdout)
        assert report["calibration"]["statistics_skip_first_tokens"] == 0 == report["plan"]["skip_first_tokens"]
    forced = json.loads(run("prune", str(cfg), "-q", "--json", "--overwrite", "--set", "calibration.skip_first_tokens=3").stdout)
    assert forced["calibration"]["statistics_skip_first_tokens"] == 3


def test_statprune_calibrates_unstructured_on_dense_activations_unless_told(cfg: Path) -> None:
    def prune(*sets: str) -> dict:
        args = ["--set", "pruning.method=statprune", "--set", "pruning.sparsity=0.7", *[a for s in sets for a in ("--set", s)]]
        res = run("prune", str(cfg), "-q", "--json", "--overwrite", *args)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    auto, dense, seq = prune(), prune("pruning.sequential=false"), prune("pruning.sequential=true")
    assert auto["mode"].startswith("dense-activation") and seq["mode"].startswith("sequential")
    assert auto["perplexity"] == dense["perplexity"] != seq["perplexity"]
    assert prune("pruning.sparsity=0.5")["mode"].startswith("dense-activation")
    assert prune("pruning.pattern=2:4")["mode"].startswith("sequential")


def test_one_pass_with_owl_prunes_from_the_owl_pass_statistics(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OWL's dense pass already computed what a dense-activation run would collect: no second pass over the windows."""
    from statprune_cli.engine import LayerwiseEngine

    passes = []
    capture = LayerwiseEngine.capture
    monkeypatch.setattr(LayerwiseEngine, "capture", lambda self, batches: passes.append(1) or capture(self, batches))
    reports = {}
    for seq in ("false", "true"):
        passes.clear()
        res = run("prune", str(cfg), "-q", "--json", "--overwrite", "--set", "pruning.method=statprune", "--set",
                  "pruning.sparsity=0.7", "--set", "pruning.profile=owl", "--set", f"pruning.sequential={seq}",
                  "--set", "eval.datasets=[]")
        assert res.exit_code == 0, res.output
        reports[seq] = (len(passes), json.loads(res.stdout))
    (one, dense), (two, seq) = reports["false"], reports["true"]
    assert (one, two) == (1, 2)
    assert "collected once, for OWL and the masks" in dense["mode"] and dense["layer_target_sparsity"] == seq["layer_target_sparsity"]


def test_the_report_table_and_plain_log_lines(cfg: Path) -> None:
    res = run("prune", str(cfg))
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "[statprune " in err and "pruning layers: 3/3" in err  # plain log lines: not a terminal
    assert "q_proj" in err and "down_proj" in err and "50.0%" in err
    assert "over the pruned linears" in err and "perplexity" in err and "mode: sequential" in err
