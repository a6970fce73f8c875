"""Compressed storage of pruned checkpoints: nonzero values plus a packed bitmask.

A 50%-sparse dense checkpoint spends half its bytes on zeros. Here each floating 2-D tensor with
enough zeros becomes ``NAME.values`` (nonzeros in row-major order, original dtype), ``NAME.bitmask``
(one bit per element, packed little-endian into uint8) and ``NAME.shape`` (int64), all in one
``model.bitmask.safetensors`` next to the original config and tokenizer files. "Zero" means an
all-zero bit pattern, so ``-0.0`` is kept as a value and the dense tensors come back bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from statprune_cli.errors import InputError
from statprune_cli.export import atomic_dir

WEIGHTS_NAME = "model.bitmask.safetensors"
INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "statprune-bitmask", "version": "1"}
MIN_ZERO_FRACTION = 0.25  # below this the values + mask are barely smaller than the dense tensor
SUFFIXES = (".values", ".bitmask", ".shape")
_BITS_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _weight_files(src: Path) -> list[Path]:
    """The files transformers would load: the shards named by the index, else ``model.safetensors``.

    Other safetensors files (Mistral's ``consolidated.safetensors``, adapters) are not this model's
    weights and are copied as is.
    """
    index = src / INDEX_NAME
    if index.is_file():
        files = [src / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise InputError(f"{src}: shards named in {INDEX_NAME} are missing: {', '.join(absent)}")
        return files
    single = src / "model.safetensors"
    return [single] if single.is_file() else []


def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Elements whose bits are not all zero (``t != 0`` would drop the sign of ``-0.0``)."""
    return t.view(_BITS_AS_INT[t.element_size()]) != 0


def _encode(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    if not (t.is_floating_point() and t.dim() == 2 and t.numel()):
        return {name: t}
    mask = _nonzero_mask(t)
    if 1 - mask.sum().item() / t.numel() < MIN_ZERO_FRACTION:
        return {name: t}
    return {f"{name}.values": t[mask],
            f"{name}.bitmask": torch.from_numpy(np.packbits(mask.flatten().numpy(), bitorder="little")),
            f"{name}.shape": torch.tensor(t.shape, dtype=torch.int64)}


def _decode(values: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    shape_t = tuple(int(s) for s in shape)
    n = math.prod(shape_t)
    mask = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=n, bitorder="little").astype(bool))
    dense = torch.zeros(n, dtype=values.dtype)
    dense[mask] = values
    return dense.view(shape_t)


def _write(src: Path, weights: list[Path], out: Path) -> None:
    """Fill the (empty, fresh) folder ``out`` from ``src``, whose model weights are ``weights``."""
    encoded: dict[str, torch.Tensor] = {}
    for f in weights:
        with safe_open(f, "pt") as sf:
            for name in sf.keys():
                for key, t in _encode(name, sf.get_tensor(name)).items():
                    if key in encoded:
                        raise InputError(f"{src}: tensor name {key} occurs twice (in the shards or as an encoded name)")
                    encoded[key] = t
    save_file(encoded, out / WEIGHTS_NAME, metadata=METADATA)
    skip = {*weights, src / INDEX_NAME}
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, out / p.name, symlinks=True)
        elif p not in skip:
            shutil.copy2(p, out / p.name)


def export_bitmask(src: Path, dst: Path, *, overwrite: bool = False) -> dict[str, int]:
    """Write ``dst`` as ``src`` with its safetensors weights in bitmask form; return both weight sizes in bytes.

    The folder is built under a temporary sibling name and renamed at the end, so a crash or a
    full disk never leaves a half-written ``dst`` that looks like a finished export.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder")
    if is_bitmask_folder(src):
        raise InputError(f"{src}: already a bitmask folder")
    weights = _weight_files(src)
    if not weights:
        raise InputError(f"{src}: no safetensors weights (model.safetensors or {INDEX_NAME}) to export")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise InputError(f"{dst}: the bitmask folder must lie outside the source folder {src}")
    with atomic_dir(dst, overwrite, key="--output") as tmp:
        _write(src, weights, tmp)
    return {"dense_bytes": sum(f.stat().st_size for f in weights), "output_bytes": (dst / WEIGHTS_NAME).stat().st_size}


def export_dense(src: Path, dst: Path, *, overwrite: bool = False) -> dict[str, int]:
    """A Hugging Face folder that ``from_pretrained`` loads: a bitmask folder decoded, or a dense one copied."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise InputError(f"{dst}: the exported folder must lie outside the source folder {src}")
    with atomic_dir(dst, overwrite, key="--output") as tmp:
        if is_bitmask_folder(src):
            save_file(load_bitmask_state_dict(src), tmp / "model.safetensors", metadata={"format": "pt"})
            for p in src.iterdir():
                if p.name != WEIGHTS_NAME:
                    (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        else:
            if not _weight_files(src):
                raise InputError(f"{src}: no safetensors weights (model.safetensors or {INDEX_NAME}) to export")
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp, symlinks=True)
    weights = _weight_files(dst)
    dense = sum(f.stat().st_size for f in weights)
    return {"dense_bytes": dense, "output_bytes": dense}


def is_bitmask_folder(path: Path) -> bool:
    """True when ``path`` holds a weights file written by ``export_bitmask`` (any version)."""
    f = Path(path) / WEIGHTS_NAME
    if not f.is_file():
        return False
    with safe_open(f, "pt") as sf:
        return (sf.metadata() or {}).get("format") == METADATA["format"]


def load_bitmask_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The dense tensors of a bitmask folder (or of its weights file), bit-identical to the source."""
    path = Path(path)
    f = path / WEIGHTS_NAME if path.is_dir() else path
    if not f.is_file():
        raise InputError(f"{path}: no {WEIGHTS_NAME}")
    with safe_open(f, "pt") as sf:
        meta = sf.metadata() or {}
        if meta.get("format") != METADATA["format"] or meta.get("version") != METADATA["version"]:
            raise InputError(f"{f}: not a statprune bitmask file of version {METADATA['version']} (metadata {meta})")
        raw = {k: sf.get_tensor(k) for k in sf.keys()}
    dense = {}
    for key, t in raw.items():
        if key.endswith(".bitmask"):
            base = key[: -len(".bitmask")]
            dense[base] = _decode(raw[f"{base}.values"], t, raw[f"{base}.shape"])
        elif not (key.endswith(SUFFIXES) and f"{key.rsplit('.', 1)[0]}.bitmask" in raw):
            dense[key] = t
    return dense


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        return torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_bitmask_model(path: Path, **kwargs: Any) -> PreTrainedModel:
    """A causal LM built from the folder's config with the bitmask weights loaded, in eval mode.

    ``kwargs`` go to ``AutoModelForCausalLM.from_config`` (``attn_implementation``, or ``dtype`` to
    override the config's). Weights that ``save_pretrained`` left out because they are tied to a
    loaded one must be the only missing keys: anything else means the weights are not this model's.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    model = AutoModelForCausalLM.from_config(config, **{"dtype": _config_dtype(config), **kwargs})
    state = load_bitmask_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise InputError(f"{path}: weights do not match the config's model: {len(untied)} missing (e.g. {untied[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.eval()
