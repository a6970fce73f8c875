"""Write output folders atomically: build in a temporary sibling, rename at the end.

A run that fails leaves no folder that looks complete; an existing folder is replaced only
with ``--overwrite``, and only once the new one is whole. Replacing takes two renames; a journal
beside the output lets the next command finish a replacement that a kill cut short between them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
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


def swap_journal(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.swap"


def replace_dir(src: Path, dst: Path) -> None:
    """Rename a complete folder ``src`` to ``dst``; an old ``dst`` is moved aside first and removed last.

    Between the two renames there is no ``dst``: the journal ``.NAME.swap`` names both folders from before the
    first rename until the old one is gone, so that ``recover_output`` can finish the swap after a kill."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    journal = swap_journal(dst)
    if dst.exists():
        write_json_atomic(journal, {"new": src.name, "old": old.name})
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)
    journal.unlink(missing_ok=True)


def recover_output(dst: Path, log: Callable[[str], None]) -> None:
    """Finish what a killed run left beside ``dst``, and say so. The caller holds the output's lock (``lock.py``),
    so no live run owns these folders.

    A journal (``replace_dir``) whose new folder is still there and ``dst`` missing: the new folder was complete,
    so it becomes ``dst``; the new folder gone and ``dst`` missing: the old folder comes back. Either way the old
    folder then goes. Without a journal, ``.NAME.old-*`` folders come back as ``dst`` if it is missing (else they
    go), and ``.NAME.tmp-*`` folders, never complete, go.
    """
    journal = swap_journal(dst)
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
            new, old = dst.parent / record["new"], dst.parent / record["old"]
        except (ValueError, KeyError, TypeError):  # cut short while written: no rename had begun
            record = None
        if record is not None and not dst.exists() and new.is_dir():
            new.rename(dst)
            log(f"completed an interrupted --overwrite of {dst}: the new output (from {new.name}) is in place")
        elif record is not None and not dst.exists() and old.is_dir():
            old.rename(dst)
            log(f"restored {dst} from {old.name}: an interrupted --overwrite had moved it aside")
        if record is not None and old.exists():
            shutil.rmtree(old)
        journal.unlink()
    for old in sorted(dst.parent.glob(f".{dst.name}.old-*")):
        if not dst.exists():
            old.rename(dst)
            log(f"restored {dst} from {old.name}, left by an interrupted --overwrite")
        else:
            shutil.rmtree(old)
            log(f"removed {old.name}, the previous {dst.name} left by an interrupted --overwrite")
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp.name}, the unfinished output of a run that was killed")


def leftovers(dst: Path) -> bool:
    """Whether a killed run left a replacement of ``dst`` unfinished (cheap: commands that only read call it)."""
    return swap_journal(dst).exists() or any(dst.parent.glob(f".{dst.name}.old-*"))


def check_output_room(out: Path, need: int | None, key: str = "output.dir") -> None:
    """Before the model loads: the output's folder (or the nearest one that exists) takes files and has ``need``
    bytes free (None: unknown, only writability is checked). Found at the end, either costs the whole run."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{key}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise InputError(f"{key}: cannot write in {parent} ({e.strerror or e})") from None
    if need is not None:
        partial = out.parent / f".{out.name}.partial"  # a resumed run has written part of it already
        need -= sum(f.stat().st_size for f in partial.glob("model-*.safetensors")) if partial.is_dir() else 0
        free = shutil.disk_usage(parent).free
        if need > free:
            raise InputError(f"{key}: {parent} has {free / 2**20:,.1f} MiB free; the output needs about "
                             f"{need / 2**20:,.1f} MiB (the checkpoint's weights in model.dtype)")


def check_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Every floating tensor about to be written is finite: a nan outside the pruned linears (an embedding, a norm)
    is never checked by pruning, and a checkpoint that holds one must not pass as a result."""
    from statprune_cli.stats import all_finite

    for name, t in tensors.items():
        if t.is_floating_point() and not all_finite(t.detach()):
            raise PruneError(f"non-finite values (nan or inf) in {name}, which the output would hold "
                             "(check the checkpoint)")


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
