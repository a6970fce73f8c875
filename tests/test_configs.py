"""The shipped configs in configs/: each one loads and validates, and the hub ones say what their names say.

Schema validation only (``load_config``): the hub models cannot be loaded here. The demo config
refers to ``../shared/data/...`` relative to the repository root, so every test runs from there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from statprune_cli.config import Config, load_config, parse_pattern
from statprune_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

HUB_IDS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}
SHARED = ROOT.parent / "shared" / "data"
HUB_CONFIGS = [ROOT / "configs" / f"{m}-statprune-{p}.yaml" for m in HUB_IDS for p in ("50", "2of4")]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _id(p: Path) -> str:
    return p.stem


def test_the_expected_configs_are_shipped() -> None:
    missing = [p.name for p in HUB_CONFIGS if not p.is_file()]
    assert not missing, f"missing configs: {missing}"
    assert (ROOT / "configs" / "smollm2-135m-statprune-50.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_every_config_loads_and_validates(path: Path) -> None:
    if "../shared/data" in path.read_text() and not SHARED.is_dir():
        pytest.skip("refers to ../shared/data, which this checkout lacks")
    cfg = load_config(path)  # unknown (typo'd) keys and bad values raise ConfigError here
    assert isinstance(cfg, Config)
    assert cfg.output.dir, "a shipped config names its output folder"
    assert Path(cfg.output.dir).name == path.stem


def test_a_typo_in_a_config_is_rejected(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "llama-3-8b-statprune-50.yaml").read_text()
    assert "  nsamples: 128" in text
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("  nsamples: 128", "  nsample: 128", 1))
    with pytest.raises(ConfigError, match=r"calibration\.nsample: unknown key"):
        load_config(bad)


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=_id)
def test_hub_configs_are_gpu_bf16_hub_data(path: Path) -> None:
    cfg = load_config(path)
    model_key, pattern_key = path.stem.split("-statprune-")
    assert cfg.model.name_or_path == HUB_IDS[model_key]
    assert cfg.model.gguf_file is None
    assert cfg.model.dtype == "bfloat16"
    assert cfg.runtime.device == "cuda"
    assert cfg.runtime.offload_activations is True

    c = cfg.calibration
    assert (c.dataset, c.data_files) == ("c4", None), "calibration from the hub's allenai/c4 shard"
    assert (c.nsamples, c.seqlen) == (128, 2048)
    assert [(d.dataset, d.data_files) for d in cfg.eval.datasets] == [("wikitext2", None)]
    assert cfg.eval.datasets[0].split in (None, "test")
    assert cfg.eval.seqlen == 2048 and cfg.eval.max_tokens is None

    p = cfg.pruning
    assert p.method == "statprune"
    assert p.options == {}, "pruning.options is left out: the method's defaults apply"
    nm = parse_pattern(p.pattern)
    if pattern_key == "50":
        assert nm is None and p.sparsity == 0.5
    else:
        assert pattern_key == "2of4" and nm == (2, 4)


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=_id)
def test_raw_yaml_quotes_patterns_and_omits_options(path: Path) -> None:
    """Plain PyYAML reads an unquoted 2:4 as the number 124; the shipped files quote it for other tools too."""
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw["pruning"]["pattern"], str)
    assert "options" not in raw["pruning"]


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_shipped_configs_leave_the_calibration_mode_and_reallocation_to_the_method(path: Path) -> None:
    """A pinned ``sequential`` or ``reallocation`` would silently override statprune's measured choices (one pass
    for unstructured, reallocated down projections at 2:4). Read as plain YAML: the demo config's data files are relative
    to the project's parent, which a clone elsewhere does not have."""
    pruning = yaml.safe_load(path.read_text())["pruning"]
    assert pruning.get("sequential") is None and pruning.get("reallocation") is None
