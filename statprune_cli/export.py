"""Write output folders atomically: build in a temporary sibling, rename at the end.

A run that fails leaves no folder that looks complete; an existing folder is replaced only
with ``--overwrite``, and only once the new one is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from statprune_cli.errors import InputError, PruneError
from statprune_cli.report import strict_json


def check_output_dir(path: Path, overwrite: bool, key: str = "output.dir") -> None:
    """Refuse an existing output folder before any heavy work, unless overwriting."""
    if path.exists() and not overwrite:
        raise InputError(f"{key}: {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise InputError(f"{key}: {path} exists and is not a folder")


@contextmanager
def atomic_dir(path: Path, overwrite: bool, key: str = "output.dir") -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block succeeds."""
    check_output_dir(path, overwrite, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename a complete folder ``src`` to ``dst``; an old ``dst`` is moved aside first and removed last."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def check_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Every floating tensor about to be written is finite: a nan outside the pruned linears (an embedding, a norm)
    is never checked by pruning, and a checkpoint that holds one must not pass as a result."""
    from statprune_cli.stats import all_finite

    for name, t in tensors.items():
        if t.is_floating_point() and not all_finite(t.detach()):
            raise PruneError(f"non-finite values (nan or inf) in {name}; nothing is written (check the checkpoint)")


def save_model_folder(folder: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, shard_size: int) -> None:
    """A Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads as is."""
    check_finite_tensors(model.state_dict())
    model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)


EXTRAS_NAME = "pruning_extras.safetensors"


def write_extras(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors a method made beside the weights (RIA's channel permutations), named ``<linear>.<key>``.

    A file of their own: transformers loads the weight files as they are, without unexpected keys.
    """
    save_file(dict(sorted(tensors.items())), str(folder / EXTRAS_NAME), metadata={"format": "pt"})


def write_json_atomic(path: Path, data: Any) -> None:
    """Write through a temporary sibling and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(strict_json(data))
    tmp.replace(path)
