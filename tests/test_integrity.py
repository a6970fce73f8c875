"""Integrity under faults and hostile input: bad files and configs are one line and exit 2, non-finite values and
full or unwritable disks never pass as results, concurrent and killed runs never mix or lose an output."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_text, tiny_model, write_config
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.data import calibration_windows

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(*args: str):
    return runner.invoke(app, list(args))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command in a process of its own: real stderr, and a kill that kills it."""
    return subprocess.run([sys.executable, "-m", "statprune_cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statprune: error:" if code == 2 else "statprune: failed:"), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def cfg(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]) -> Path:
    return write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out")


# ---------------------------------------------------------------- 6-9: bad input is one line and exit 2


def _bad_inputs(tmp_path: Path, cfg: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra arguments of `prune CONFIG`, expected part of the one-line error)."""
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    broken = tmp_path / "broken.jsonl"
    good = "".join(json.dumps({"text": random_text(300, seed=i)}) + "\n" for i in range(10))
    broken.write_text(good + '{"text": "an unfinished record", "source": "here"\n')
    null = tmp_path / "null.jsonl"
    null.write_text(good + '{"text": null}\n')
    return {
        "binary calibration file": (["--set", f"calibration.dataset=jsonl:{binary}"], f"{binary} is not UTF-8 text"),
        "binary evaluation file": (["--set", f"eval.datasets=[text:{binary}]"], f"{binary} is not UTF-8 text"),
        "broken JSON line": (["--set", f"calibration.dataset=jsonl:{broken}"], f"{broken} line 11: not valid JSON"),
        "null text": (["--set", f"calibration.dataset=jsonl:{null}"], f"record 10 (line 11) of {null}: 'text' is null, "
                                                                     "expected a string"),
        "malformed --set value": (["--set", "pruning.sparsity=[0.5"], "--set pruning.sparsity: not valid YAML: expected "
                                                                     "',' or ']'"),
        "YAML tag in --set": (["--set", "model.name_or_path=!!python/object/apply:os.system [touch pwned]"],
                              "--set model.name_or_path: not valid YAML: could not determine a constructor for the tag"),
    }


@pytest.mark.parametrize("case", ["binary calibration file", "binary evaluation file", "broken JSON line", "null text",
                                  "malformed --set value", "YAML tag in --set"])
def test_bad_data_and_overrides_are_one_line_and_exit_2(case: str, cfg: Path, tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    args, message = _bad_inputs(tmp_path, cfg, tiny_model_dir)[case]
    line = one_line_error(run("prune", str(cfg), "-q", *args))
    assert message in line
    assert not (tmp_path / "out").exists() and not Path("pwned").exists()


def test_a_binary_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 10)
    assert f"{path}: not UTF-8 text (byte 0x89 at offset 0)" in one_line_error(run("prune", str(path)))


def test_duplicate_keys_are_refused_with_both_lines(cfg: Path) -> None:
    """A second ``pruning:`` section would silently switch the method (PyYAML keeps the last)."""
    text = cfg.read_text() + "pruning:\n  method: statprune\n"
    first = 1 + text.splitlines().index("pruning:")
    cfg.write_text(text)
    last = len(text.splitlines()) - 1
    line = one_line_error(run("prune", str(cfg), "-q"))
    assert f"{cfg}: duplicate key 'pruning' at lines {first} and {last}" in line


def test_an_alias_bomb_is_refused_at_once_and_briefly(tmp_path: Path) -> None:
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(rows) + "\nmodel: {name_or_path: *i}\n")
    t0 = time.perf_counter()
    line = one_line_error(run("prune", str(path)))
    assert time.perf_counter() - t0 < 5
    assert "aliases expand to more than 10000 values" in line and len(line) < 300


def test_a_long_echoed_value_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"pruning": {"sparsity": ["x" * 100] * 50}}))
    line = one_line_error(run("prune", str(path), "--set", "model.name_or_path=m"))
    assert "pruning.sparsity: expected a number, got ['xxx" in line and "more characters)" in line
    assert len(line) < 400


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: m\n   dtype: float32\n")
    assert f"{path}: not valid YAML: mapping values are not allowed here at line 3, column 9" in one_line_error(
        run("prune", str(path)))


def test_a_truncated_safetensors_file_is_named(cfg: Path, tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for streaming in ("false", "true"):
        line = one_line_error(run("prune", str(cfg), "-q", "--set", f"runtime.streaming={streaming}"))
        assert f"model.name_or_path: {weights} is truncated" in line
    assert f"{weights} is truncated" in one_line_error(run("eval-ppl", str(tiny_model_dir), "-q"))


def test_a_text_of_exactly_one_window_gives_that_window() -> None:
    """nsamples x seqlen tokens in all: the token stream has exactly one start, which Wanda's draw left out."""
    ids = list(range(3, 35))
    windows, origin = calibration_windows(["one document"], lambda texts: [ids for _ in texts], 1, 32, 0,
                                          log=lambda _: None)
    assert origin == "token stream" and windows.tolist() == [ids]


@pytest.mark.skipif(not (SHARED / "zeroshot").is_dir(), reason="needs ../shared/data/zeroshot")
def test_eval_zeroshot_names_a_missing_eos_token(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "no-eos"
    tiny_model("llama").save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    line = one_line_error(run("eval-zeroshot", str(folder), "--tasks", "boolq", "--limit", "2", "--data-dir",
                              str(SHARED / "zeroshot"), "-q"))
    assert f"the tokenizer of {folder} has no EOS token" in line


# ---------------------------------------------------------------- 11: defaults checked only where used


def test_a_config_without_eval_runs_on_a_short_context_model(cfg: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(cfg.read_text())
    del data["eval"]
    cfg.write_text(yaml.safe_dump(data))
    res = run("prune", str(cfg), "-q", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["perplexity"] == []
    # with a data set the default applies, and the message says which key to set
    line = one_line_error(run("prune", str(cfg), "-q", "--set", f"eval.datasets=[text:{tmp_path / 'eval.txt'}]",
                              "-o", str(tmp_path / "other")))
    assert line.endswith("eval.seqlen: expected at most the model's context (256 tokens), got 2048; 2048 is the "
                         "default: set eval.seqlen to at most 256")


# ---------------------------------------------------------------- 3: non-finite values


def _poisoned(model_dir: Path, tensor: str) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        param = model.get_parameter(tensor)
        param[5 if param.dim() == 2 else 0] = float("nan")  # an embedding row of a token the text holds
    model.save_pretrained(model_dir)


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight"])
def test_nan_outside_the_pruned_linears_is_an_error(cfg: Path, tmp_path: Path, tiny_model_dir: Path,
                                                     text_files: dict[str, Path], tensor: str) -> None:
    _poisoned(tiny_model_dir, tensor)
    magnitude = ["--set", "pruning.method=magnitude"]
    line = one_line_error(run("prune", str(cfg), "-q", "--json", *magnitude), code=1)
    assert f"perplexity on text:{text_files['eval']} is not finite" in line
    for streaming in ("false", "true"):
        line = one_line_error(run("prune", str(cfg), "-q", *magnitude, "--set", "eval.datasets=[]", "--set",
                                  f"runtime.streaming={streaming}"), code=1)
        assert f"non-finite values (nan or inf) in {tensor}" in line
    assert not (tmp_path / "out").exists()
    line = one_line_error(run("eval-ppl", str(cfg), "-q", "--json"), code=1)
    assert "is not finite" in line


def test_reports_are_strict_json() -> None:
    from statprune_cli.report import strict_json

    text = strict_json({"perplexity": [{"dataset": "d", "perplexity": math.nan}], "layer_target_sparsity": [0.5, math.inf]})

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    data = json.loads(text, parse_constant=refuse)
    assert data["perplexity"][0] == {"dataset": "d", "perplexity": None, "non_finite": {"perplexity": "nan"}}
    assert data["layer_target_sparsity"] == [0.5, None]
    assert data["non_finite"] == {"layer_target_sparsity": "non-finite numbers, now null"}


# ---------------------------------------------------------------- 9: --quiet


def test_quiet_prints_nothing_on_stderr(cfg: Path, tiny_model_dir: Path) -> None:
    res = run_cli("prune", str(cfg), "-q", "--set", "runtime.streaming=false")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    res = run_cli("eval-ppl", str(cfg), "-q")
    assert res.returncode == 0 and res.stderr == "", res.stderr


# ---------------------------------------------------------------- 1: one run per output


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s lock, as a running prune does, until it is killed."""
    code = ("import sys; from pathlib import Path; from statprune_cli.lock import output_lock\n"
            "with output_lock(Path(sys.argv[1]), print):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_locked_output_stops_at_once_and_a_dead_holder_is_taken_over(cfg: Path, tmp_path: Path) -> None:
    import socket

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        line = one_line_error(run("prune", str(cfg), "-q", "--set", "runtime.streaming=true"), code=1)
        assert f"{out} is in use by another statprune run (pid {holder.pid} on host {socket.gethostname()}, started " \
               f"{time.strftime('%Y-%m-%d')}" in line
        assert not (tmp_path / ".out.partial").exists()  # stopped before any work
    finally:
        holder.kill()
        holder.wait()
    res = run("prune", str(cfg), "--set", "runtime.streaming=true")  # the holder died: its lock is taken over
    assert res.exit_code == 0, res.output
    assert f"taking over the lock on {out} left by pid {holder.pid}" in res.stderr
    assert (out / "report.json").is_file() and not (tmp_path / ".out.lock").exists()


def test_calibrate_and_export_stop_at_once_on_an_output_another_run_writes(cfg: Path, tmp_path: Path) -> None:
    stats, dense = tmp_path / "s.safetensors", tmp_path / "dense"
    assert run("prune", str(cfg), "-q").exit_code == 0
    for out, args in ((stats, ("calibrate", str(cfg), "-q", "-o", str(stats))),
                      (dense, ("export", str(tmp_path / "out"), "-q", "--format", "dense", "-o", str(dense)))):
        holder = _hold_lock(out)
        try:
            line = one_line_error(run(*args), code=1)
            assert f"{out} is in use by another statprune run (pid {holder.pid}" in line
            assert not out.exists()
        finally:
            holder.kill()
            holder.wait()
        assert run(*args).exit_code == 0 and out.exists() and not (tmp_path / f".{out.name}.lock").exists()


def test_a_lock_record_from_another_host_stops_the_run(cfg: Path, tmp_path: Path) -> None:
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": 12, "host": "elsewhere", "started": "then"}))
    line = one_line_error(run("prune", str(cfg), "-q"), code=1)
    assert "locked by a run on another host (pid 12 on host elsewhere, started then)" in line
    assert f"delete {tmp_path / '.out.lock'}" in line


# ---------------------------------------------------------------- 4: unwritable or full output location


def test_an_unwritable_output_location_is_refused_before_the_model_loads(cfg: Path, tmp_path: Path, tiny_model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import statprune_cli.commands.prune

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(statprune_cli.commands.prune, "load_model", no_load)
    try:
        Path("/sys/statprune-probe").mkdir()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    line = one_line_error(run("prune", str(cfg), "-q", "-o", "/sys/statprune-out/run"))
    assert "output.dir: cannot write in /sys" in line
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    line = one_line_error(run("prune", str(cfg), "-q"))
    need = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors")) / 2**20
    assert f"output.dir: {tmp_path} has 0.1 MiB free; the output needs about {need:.1f} MiB" in line
    assert not list(tmp_path.glob(".out*"))


def test_a_hub_checkpoint_is_sized_from_the_cache_or_the_hubs_headers(tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The room check needs the output's size for a hub id too: read from a cached snapshot's safetensors headers,
    else from the hub's header metadata, else unknown (only writability is checked)."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants

    from statprune_cli.config import ModelConfig
    from statprune_cli.load import output_bytes

    local = output_bytes(ModelConfig(name_or_path=str(tiny_model_dir)))
    stored = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert local is not None and 0.99 * stored < local <= stored  # float32 in, float32 out: the tensors, no header
    assert output_bytes(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16")) == local // 2

    cache = tmp_path / "hub"
    snapshot = cache / "models--owner--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--owner--tiny" / "refs").mkdir()
    (cache / "models--owner--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    asked: list[str] = []

    def headers(self, repo_id: str, revision: str | None = None):
        asked.append(repo_id)
        if repo_id != "owner/remote":
            raise OSError("not found")
        return SimpleNamespace(parameter_count={"F32": 1000, "I64": 10})

    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", headers)
    assert output_bytes(ModelConfig(name_or_path="owner/tiny")) == local and asked == []
    assert output_bytes(ModelConfig(name_or_path="owner/remote")) == 4000 + 80
    assert output_bytes(ModelConfig(name_or_path="owner/remote", dtype="bfloat16")) == 2000 + 80
    assert output_bytes(ModelConfig(name_or_path="owner/gone")) is None and asked == ["owner/remote"] * 2 + ["owner/gone"]
    assert output_bytes(ModelConfig(name_or_path="/no/such/folder")) is None and len(asked) == 3


# ---------------------------------------------------------------- 5: --overwrite cut short between its renames


def _fail_second_rename(monkeypatch: pytest.MonkeyPatch, dst: Path) -> None:
    """A fault (a kill, a power cut) after the old output is moved aside and before the new one takes its name."""
    rename = Path.rename

    def faulty(self: Path, target):
        if Path(target) == dst and self.name != f".{dst.name}.old-{os.getpid()}" and \
                list(dst.parent.glob(f".{dst.name}.old-*")):
            raise KeyboardInterrupt("killed between the renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", faulty)


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_an_interrupted_overwrite_is_completed_by_the_next_command(cfg: Path, tmp_path: Path, streaming: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    stream = ["--set", f"runtime.streaming={streaming}"]
    assert run("prune", str(cfg), "-q", *stream).exit_code == 0
    first = (out / "report.json").read_text()
    with monkeypatch.context() as m:
        _fail_second_rename(m, out)
        res = run("prune", str(cfg), "-q", "--overwrite", "--set", "pruning.sparsity=0.6", *stream)
    assert res.exit_code != 0 and not out.exists()
    assert list(tmp_path.glob(".out.old-*")) and (tmp_path / ".out.swap").is_file()
    res = run("eval-ppl", str(out), "--dataset", f"text:{tmp_path / 'eval.txt'}", "--seqlen", "32", "--json")
    assert res.exit_code == 0, res.output
    assert f"completed an interrupted --overwrite of {out}: the new output" in res.stderr
    assert json.loads((out / "report.json").read_text())["target_sparsity"] == 0.6 != json.loads(first)["target_sparsity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_overwrite_cut_short_before_the_new_folder_was_named_restores_the_old_one(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("prune", str(cfg), "-q").exit_code == 0
    old = tmp_path / ".out.old-99999"
    out.rename(old)  # what the first rename leaves, the new folder lost with it
    (tmp_path / ".out.swap").write_text(json.dumps({"new": ".out.tmp-99999", "old": old.name}))
    res = run("export", str(out), "--format", "dense", "-o", str(tmp_path / "dense"))
    assert res.exit_code == 0, res.output
    assert f"restored {out} from .out.old-99999" in res.stderr
    assert (out / "report.json").is_file() and not old.exists() and not (tmp_path / ".out.swap").exists()


def test_a_killed_in_memory_run_leaves_nothing_the_next_run_keeps(cfg: Path, tmp_path: Path) -> None:
    dead = tmp_path / ".out.tmp-99999"  # a run killed while writing: incomplete, never renamed
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    res = run("prune", str(cfg))
    assert res.exit_code == 0, res.output
    assert "removed .out.tmp-99999, the unfinished output of a run that was killed" in res.stderr
    assert not dead.exists()


# ---------------------------------------------------------------- 2, 10, 12: resuming a killed streaming run


def _kill_after_layer_1(cfg: Path, tmp_path: Path, *args: str) -> None:
    killed = run_cli("prune", str(cfg), "-q", *args, env={"STATPRUNE_TEST_KILL_AFTER_LAYER": "1",
                                                          "TMPDIR": str(tmp_path / "tmp")})
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / ".out.partial" / "progress.json").is_file()


@pytest.fixture
def streaming_cfg(cfg: Path, tmp_path: Path) -> Path:
    (tmp_path / "tmp").mkdir()
    data = yaml.safe_load(cfg.read_text())
    data["runtime"].update(streaming=True, threads=1)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_a_resume_on_a_replaced_checkpoint_is_refused(streaming_cfg: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    _kill_after_layer_1(streaming_cfg, tmp_path)
    assert not list((tmp_path / "tmp").iterdir())  # no tokenizer files left in /tmp
    tiny_model("llama", seed=1).save_pretrained(tiny_model_dir)  # same shapes, same header, other weights
    res = run_cli("prune", str(streaming_cfg), "-q")
    assert res.returncode == 2, res.stderr
    assert f"holds a partial run of other inputs (model.safetensors: its contents changed); its layers would not " \
           f"match these: delete {tmp_path / '.out.partial'} to start over" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_resume_on_other_calibration_text_is_refused(streaming_cfg: Path, tmp_path: Path,
                                                       text_files: dict[str, Path]) -> None:
    _kill_after_layer_1(streaming_cfg, tmp_path)
    text_files["cal"].write_text("".join(json.dumps({"text": random_text(300, seed=50 + i)}) + "\n" for i in range(20)))
    res = run_cli("prune", str(streaming_cfg), "-q")
    assert res.returncode == 2 and "(the calibration windows (the data, the tokenizer or their text changed))" in res.stderr


def test_a_resume_with_other_statistics_is_refused(streaming_cfg: Path, tmp_path: Path) -> None:
    stats = tmp_path / "s.safetensors"
    assert run("calibrate", str(streaming_cfg), "-q", "-o", str(stats)).exit_code == 0
    _kill_after_layer_1(streaming_cfg, tmp_path, "--stats", str(stats))
    assert run("calibrate", str(streaming_cfg), "-q", "-o", str(stats), "--overwrite",
               "--set", "calibration.seed=7").exit_code == 0
    res = run_cli("prune", str(streaming_cfg), "-q", "--stats", str(stats))
    assert res.returncode == 2 and "(the --stats file (another file, other contents, or given on one run only))" in res.stderr
    res = run_cli("prune", str(streaming_cfg), "-q")  # nor without them: the layers so far came from statistics
    assert res.returncode == 2 and "holds a partial run of" in res.stderr


def test_a_resume_needs_the_same_thread_count_and_leaves_no_tokenizer_files(streaming_cfg: Path, tmp_path: Path) -> None:
    _kill_after_layer_1(streaming_cfg, tmp_path)
    res = run_cli("prune", str(streaming_cfg), "-q", "--set", "runtime.threads=2")
    assert res.returncode == 2
    assert "holds a partial run on 1 thread(s), this one has 2: its later layers would differ by rounding; set " \
           "runtime.threads: 1 to resume" in res.stderr
    res = run_cli("prune", str(streaming_cfg), "-q", env={"TMPDIR": str(tmp_path / "tmp")})
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "report.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not list((tmp_path / "tmp").iterdir())
