"""Bitmask export: smaller on disk, and the dense weights and logits come back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import statprune_cli.bitmask as bitmask
from statprune_cli.bitmask import export_bitmask, is_bitmask_folder, load_bitmask_model, load_bitmask_state_dict
from statprune_cli.errors import InputError

EXTRA_FILES = {"statprune.yaml": "pruning:\n  sparsity: 0.5\n", "report.json": '{"ppl": 12.5}\n'}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _prune_half(model: nn.Module) -> None:
    """Zero the smaller-magnitude half of every row of every decoder linear, as a pruning run would."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                w = m.weight
                w.scatter_(1, w.abs().argsort(dim=1)[:, : w.shape[1] // 2], 0)


def _save_pruned(d: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **save_kw) -> Path:
    model = tiny_model(arch).to(dtype)
    _prune_half(model)
    if arch == "llama":  # a negative zero must survive too (bit-identical, not just ==)
        w = model.model.layers[0].self_attn.q_proj.weight
        with torch.no_grad():
            w[0, int((w[0] == 0).nonzero()[0])] = -0.0
    model.save_pretrained(d, **save_kw)
    tiny_tokenizer().save_pretrained(d)
    for name, text in EXTRA_FILES.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {"llama": _save_pruned(root / "llama"),
            "sharded": _save_pruned(root / "sharded", max_shard_size="100KB"),
            "bf16": _save_pruned(root / "bf16", dtype=torch.bfloat16),
            "tied": _save_pruned(root / "tied", arch="opt")}


def _dense_state(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()]) if t.is_floating_point() else t


def _siblings(p: Path) -> list[str]:
    return sorted(x.name for x in p.parent.iterdir())


def test_layout_sizes_and_copied_files(dense: dict[str, Path], tmp_path: Path) -> None:
    src, dst = dense["llama"], tmp_path / "out"
    sizes = export_bitmask(src, dst)

    assert sizes == {"dense_bytes": (src / "model.safetensors").stat().st_size,
                     "output_bytes": (dst / "model.bitmask.safetensors").stat().st_size}
    # Half the decoder bytes are zeros: values + 1 bit per element must save well over a quarter.
    assert sizes["output_bytes"] < 0.7 * sizes["dense_bytes"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["model.bitmask.safetensors"] + [p.name for p in src.iterdir() if p.name != "model.safetensors"])
    for p in src.iterdir():
        if p.name != "model.safetensors":
            assert (dst / p.name).read_bytes() == p.read_bytes(), p.name
    assert _siblings(dst) == ["out"]  # no temporary folder left
    assert is_bitmask_folder(dst) and not is_bitmask_folder(src)

    with safe_open(dst / "model.bitmask.safetensors", "pt") as f:
        assert f.metadata() == {"format": "statprune-bitmask", "version": "1"}
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj.weight"
        values, mask, shape = (f.get_tensor(f"{q}.{s}") for s in ("values", "bitmask", "shape"))
    assert q not in keys and "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert shape.dtype == torch.int64 and shape.tolist() == [64, 64]
    assert values.dtype == torch.float32 and values.shape == (64 * 32 + 1,)  # 50% zeros, one of them -0.0
    assert mask.dtype == torch.uint8 and mask.shape == (64 * 64 // 8,)


@pytest.mark.parametrize("case", ["llama", "sharded", "bf16", "tied"])
def test_round_trip_is_exact(dense: dict[str, Path], tmp_path: Path, case: str) -> None:
    src, dst = dense[case], tmp_path / "out"
    if case == "sharded":
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    export_bitmask(src, dst)

    want, got = _dense_state(src), load_bitmask_state_dict(dst)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(_bits(got[k]), _bits(want[k])), k

    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    model = load_bitmask_model(dst)
    assert not model.training and model.dtype == ref.dtype
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_tied_source_has_no_lm_head(dense: dict[str, Path]) -> None:
    """Guards the tied case above: it only tests something if the head really is absent on disk."""
    assert "lm_head.weight" not in _dense_state(dense["tied"])


def test_weights_not_matching_the_config_are_refused(dense: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    export_bitmask(dense["llama"], dst)
    state = load_bitmask_state_dict(dst)
    del state["model.norm.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, dst / "model.bitmask.safetensors", metadata={"format": "statprune-bitmask", "version": "1"})
    with pytest.raises(InputError, match=r"1 missing \(e.g. \['model.norm.weight'\]\), 1 unexpected"):
        load_bitmask_model(dst)


def test_existing_dst_needs_overwrite(dense: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        export_bitmask(dense["llama"], dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"

    export_bitmask(dense["llama"], dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and is_bitmask_folder(dst)
    assert _siblings(dst) == ["out"]


def test_failed_write_leaves_nothing(dense: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bitmask, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_bitmask(dense["llama"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_sources(dense: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no-weights"):
        export_bitmask(empty, tmp_path / "out")

    export_bitmask(dense["llama"], tmp_path / "once")
    with pytest.raises(InputError, match="already a bitmask folder"):
        export_bitmask(tmp_path / "once", tmp_path / "twice")
    with pytest.raises(InputError, match="outside"):
        export_bitmask(dense["llama"], dense["llama"] / "inner")
    assert not (tmp_path / "out").exists() and not (tmp_path / "twice").exists()
