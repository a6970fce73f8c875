"""Windows that start with BOS where the model's tokenizer adds it (calibration.bos, eval.bos)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_text, tiny_model, tiny_tokenizer, write_config
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.config import DataConfig, load_config
from statprune_cli.data import added_bos, calibration_windows, eval_windows, load_documents, window_bos
from statprune_cli.errors import ConfigError
from statprune_cli.perplexity import load_eval_set
from statprune_cli.commands.calibrate import run_calibrate
from statprune_cli.commands.eval_ppl import run_eval
from statprune_cli.data import calibration_batches
from statprune_cli.stats import load_stats
from statprune_cli.ui import UI

BOS = 1
QUIET = UI(quiet=True)


def model_dir(tmp_path: Path, arch: str, bos: bool) -> Path:
    d = tmp_path / f"tiny-{arch}-{'bos' if bos else 'plain'}"
    tiny_model(arch).save_pretrained(d)
    tiny_tokenizer(bos=bos).save_pretrained(d)
    return d


def config(tmp_path: Path, model: Path, files: dict[str, Path], calibration: dict | None = None, **eval_keys):
    return load_config(write_config(tmp_path / "run.yaml", model, files, tmp_path / "out",
                                    calibration=calibration or {}, eval=eval_keys))


def test_detects_a_bos_the_tokenizer_adds_not_one_it_only_names() -> None:
    from tokenizers import processors

    assert added_bos(tiny_tokenizer(bos=True)) == BOS
    assert added_bos(tiny_tokenizer()) is None  # names <s> as bos_token, never adds it
    eos_only = tiny_tokenizer()
    eos_only._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    assert added_bos(eos_only) is None


def test_auto_true_false() -> None:
    plain, with_bos = tiny_tokenizer(), tiny_tokenizer(bos=True)
    assert window_bos(with_bos, "auto", "k") == BOS and window_bos(plain, "auto", "k") is None
    assert window_bos(with_bos, False, "k") is None and window_bos(plain, True, "k") == BOS
    no_bos_token = tiny_tokenizer()
    no_bos_token.bos_token = None
    with pytest.raises(ConfigError, match="calibration.bos: true puts BOS first in every window, but the tokenizer has no bos_token"):
        window_bos(no_bos_token, True, "calibration.bos")


@pytest.mark.parametrize("key", ["calibration", "eval"])
@pytest.mark.parametrize("value", ["maybe", 1])
def test_bad_values_name_the_key(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], key: str,
                                 value: object) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out", **{key: {"bos": value}})
    with pytest.raises(ConfigError, match=f"{key}.bos: expected auto, true or false, got '?{value}'?"):
        load_config(cfg)


def test_calibration_windows_hold_bos_then_seqlen_minus_one_text_tokens() -> None:
    tok = tiny_tokenizer(bos=True)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    docs = [random_text(n, seed=i) for i, n in enumerate([200, 300, 250, 400])]
    w, _ = calibration_windows(docs, tokenize, 5, 64, seed=0, log=lambda m: None, bos=BOS)
    text, _ = calibration_windows(docs, tokenize, 5, 63, seed=0, log=lambda m: None)
    assert w.shape == (5, 64) and w.dtype == torch.long
    assert (w[:, 0] == BOS).all() and torch.equal(w[:, 1:], text) and not (text == BOS).any()


def test_eval_windows_with_bos_count_whole_windows() -> None:
    ids = torch.arange(3, 1003)
    w = eval_windows(ids, 64, 200, bos=BOS)
    assert w.shape == (3, 64) and (w[:, 0] == BOS).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[: 3 * 63])  # the stream, 63 text tokens a window, no gap
    assert eval_windows(ids, 64, None, bos=BOS).shape == (1000 // 63, 64)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_calibration_batches_start_with_bos_and_settle_auto(tmp_path: Path, text_files: dict[str, Path], arch: str) -> None:
    d = model_dir(tmp_path, arch, bos=True)
    cfg = config(tmp_path, d, text_files)
    batches, description = calibration_batches(cfg, tiny_tokenizer(bos=True), QUIET)
    w = torch.cat(batches)
    assert w.shape == (8, 32) and (w[:, 0] == BOS).all() and not (w[:, 1:] == BOS).any()
    assert cfg.calibration.bos is True and "(BOS first)" in description
    cfg = config(tmp_path, d, text_files, calibration={"bos": False})
    assert not (torch.cat(calibration_batches(cfg, tiny_tokenizer(bos=True), QUIET)[0]) == BOS).any()


def test_a_tokenizer_without_bos_gives_the_windows_it_gave_before(tmp_path: Path, tiny_model_dir: Path,
                                                                  text_files: dict[str, Path]) -> None:
    """auto on a tokenizer that adds no BOS (SmolLM2's, Qwen2's): the same calls as before BOS handling existed."""
    tok = tiny_tokenizer()
    cfg = config(tmp_path, tiny_model_dir, text_files, max_tokens=320)
    batches, description = calibration_batches(cfg, tok, QUIET)
    docs = load_documents(cfg.calibration, "calibration", "train")
    before, _ = calibration_windows(docs, lambda t: tok(t, add_special_tokens=False)["input_ids"], 8, 32, 0, log=lambda m: None)
    assert torch.equal(torch.cat(batches), before) and cfg.calibration.bos is False and "BOS" not in description
    es = load_eval_set(tok, cfg.eval.datasets[0], 32, 320)
    stream = tok(Path(text_files["eval"]).read_text(), return_tensors="pt").input_ids[0]
    assert torch.equal(es.windows, stream[:320].reshape(10, 32)) and es.bos is False


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("skip", [0, 1, 3])
def test_statistics_skip_counts_the_bos_position(tmp_path: Path, text_files: dict[str, Path], arch: str, skip: int) -> None:
    """Layer 0's q_proj reads the normed embeddings, position by position: its statistics are those of the window
    positions from ``skip`` on, BOS being position 0."""
    d = model_dir(tmp_path, arch, bos=True)
    cfg = config(tmp_path, d, text_files, calibration={"skip_first_tokens": skip})
    run_calibrate(cfg, tmp_path / "stats.safetensors", ui=QUIET)
    stats, skipped = load_stats(tmp_path / "stats.safetensors")
    windows = torch.cat(calibration_batches(config(tmp_path, d, text_files), tiny_tokenizer(bos=True), QUIET)[0])
    assert skipped == skip and (windows[:, 0] == BOS).all()
    model = tiny_model(arch)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows))[:, skip:].double()
    s = stats["model.layers.0.self_attn.q_proj"]
    assert s.count == 8 * (32 - skip)
    torch.testing.assert_close(s.sum, x.sum((0, 1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.sumsq, (x * x).sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bos_is_never_a_perplexity_target(tmp_path: Path, text_files: dict[str, Path], arch: str) -> None:
    d = model_dir(tmp_path, arch, bos=True)
    cfg = config(tmp_path, d, text_files, max_tokens=320)
    (r,) = run_eval(cfg, QUIET)
    w = load_eval_set(tiny_tokenizer(bos=True), cfg.eval.datasets[0], 32, 320).windows
    assert r["bos"] is True and r["windows"] == 10 and r["tokens"] == 320 and r["scored_tokens"] == 10 * 31
    assert (w[:, 0] == BOS).all() and not (w[:, 1:] == BOS).any()
    with torch.no_grad():
        logits = tiny_model(arch)(w).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))  # targets: positions 1..31
    assert r["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)


def test_eval_ppl_bos_false_is_the_single_token_stream(tmp_path: Path, text_files: dict[str, Path]) -> None:
    d = model_dir(tmp_path, "llama", bos=True)
    ev = DataConfig(dataset=f"text:{text_files['eval']}")
    tok = tiny_tokenizer(bos=True)
    stream = load_eval_set(tok, ev, 32, 320, bos=False)
    assert torch.equal(stream.windows.reshape(-1), tok(text_files["eval"].read_text(), return_tensors="pt").input_ids[0][:320])
    assert stream.windows[0, 0] == BOS and not (stream.windows[1:, 0] == BOS).any()  # one BOS, at the stream's start
    run = CliRunner().invoke
    args = ["eval-ppl", str(d), "--dataset", f"text:{text_files['eval']}", "--seqlen", "32", "--max-tokens", "320",
            "--device", "cpu", "-q", "--json"]
    records = {}
    for flag in ("auto", "false", "true"):
        res = run(app, [*args, "--bos", flag])
        assert res.exit_code == 0, res.output
        records[flag] = json.loads(res.stdout)[0]
    assert records["auto"]["bos"] and records["true"]["bos"] and not records["false"]["bos"]
    assert records["auto"]["perplexity"] == records["true"]["perplexity"] != records["false"]["perplexity"]
    assert records["false"]["scored_tokens"] == records["auto"]["scored_tokens"] == 10 * 31
    res = run(app, [*args, "--bos", "maybe"])
    assert res.exit_code == 2 and "eval.bos: expected auto, true or false, got 'maybe'" in res.output


@pytest.mark.parametrize("bos", [True, False])
def test_report_says_whether_windows_started_with_bos(tmp_path: Path, text_files: dict[str, Path], bos: bool) -> None:
    d = model_dir(tmp_path, "llama", bos=bos)
    cfg = write_config(tmp_path / "run.yaml", d, text_files, tmp_path / "out")
    res = CliRunner().invoke(app, ["prune", str(cfg), "-q", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["calibration"]["bos"] is bos and report["perplexity"][0]["bos"] is bos
    assert ("(BOS first)" in report["calibration"]["description"]) is bos
    assert f"bos: {str(bos).lower()}" in (tmp_path / "out" / "statprune.yaml").read_text()
