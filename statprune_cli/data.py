"""Text sources, calibration windows and evaluation windows.

Calibration windows are drawn as in the Wanda and SparseGPT code: a random document longer than
the window, then a random offset, from a seeded generator (the same config gives the same
windows, bit for bit). When too few documents are long enough, windows come from the
concatenated token stream instead.

Windows start with BOS where the model expects it (``calibration.bos``, ``eval.bos``): families whose tokenizer adds
BOS by default are trained to see it first, and some use it as their attention sink.
"""

from __future__ import annotations

import gzip
import json
import random
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from statprune_cli.config import Config, DataConfig
from statprune_cli.errors import ConfigError, InputError, shown
from statprune_cli.memory import trim_heap
from statprune_cli.ui import UI

C4_HUB = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")
MAX_CALIBRATION_DOCS = 20_000  # tokenizing more than this buys nothing for a few hundred windows
TOKENIZE_CHUNK = 256


def _read_text(path: Path, key: str) -> str:
    """A text file's contents; a file that is not UTF-8 (a binary file given by mistake) is bad input."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{key}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def _json_records(path: Path, key: str) -> Iterator[tuple[int | None, Any]]:
    """(line number, record) of a JSON-lines file, or (None, record) of a JSON array, read as a stream."""
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            first = f.read(1)
            f.seek(0)
            if first == "[":
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise InputError(f"{key}: {path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                yield from ((None, rec) for rec in records)
                return
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:  # its line number is 1: json.loads sees one line
                    raise InputError(f"{key}: {path} line {line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
                yield line_no, rec
    except UnicodeDecodeError:
        raise InputError(f"{key}: {path} is not UTF-8 text (line {line_no + 1})") from None


def _read_jsonl(path: Path, column: str, key: str) -> list[str]:
    docs = []
    for i, (line, rec) in enumerate(_json_records(path, key)):
        where = f"record {i}" + (f" (line {line})" if line else "") + f" of {path}"
        if not isinstance(rec, dict) or column not in rec:
            raise InputError(f"{key}: {where} has no column {column!r} (text_column)")
        if not isinstance(rec[column], str):
            value = "null" if rec[column] is None else shown(rec[column])
            raise InputError(f"{key}: {where}: {column!r} is {value}, expected a string")
        docs.append(rec[column])
    return docs


def _wikitext_rows(path: Path, key: str) -> list[str]:
    """Rows of the Hugging Face ``wikitext`` data set from a ``wiki.*.raw`` file (blank line = empty row)."""
    lines = _read_text(path, key).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def _hub(name: str, subset: str | None, split: str, column: str, data_files: str | None, key: str) -> list[str]:
    import datasets  # imported lazily: it is slow to import and only the hub path needs it

    try:
        ds = datasets.load_dataset(name, subset, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types: offline, missing split, unknown name
        raise InputError(f"{key}: cannot load data set {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise InputError(f"{key}.text_column: {column!r} is not a column of {name!r}; columns: {ds.column_names}")
    return list(ds[column])


def load_documents(d: DataConfig, key: str, default_split: str) -> list[str]:
    """The documents of a text source, as a list of strings."""
    split = d.split or default_split
    if d.dataset == "c4":
        if d.data_files and Path(d.data_files).exists():
            return _read_jsonl(Path(d.data_files), d.text_column, key)
        return _hub(C4_HUB[0], None, "train", d.text_column, {"train": d.data_files or C4_HUB[1]}, key)
    if d.dataset == "wikitext2":
        split_file = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}.get(split, split)
        if d.data_files:
            p = Path(d.data_files)
            p = p / f"wiki.{split_file}.raw" if p.is_dir() else p
            if not p.is_file():
                raise InputError(f"{key}.data_files: no wiki.{split_file}.raw at {d.data_files}")
            return _wikitext_rows(p, f"{key}.data_files")
        return _hub("Salesforce/wikitext", "wikitext-2-raw-v1", split, "text", None, key)
    kind, ref = d.dataset.split(":", 1)
    if kind == "text":
        return [_read_text(Path(ref), f"{key}.dataset")]
    if kind == "jsonl":
        return _read_jsonl(Path(ref), d.text_column, key)
    return _hub(ref, d.subset, split, d.text_column, d.data_files, key)


def eval_text(d: DataConfig, key: str) -> str:
    """The evaluation text: rows joined with "\\n\\n", as the GPTQ/SparseGPT/Wanda protocol does."""
    return "\n\n".join(load_documents(d, key, default_split="test"))


def added_bos(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id when it puts it before text by default, else None.

    Read from what the tokenizer does, not from ``bos_token`` or ``add_bos_token``: many tokenizers name a BOS they
    never add, and fast tokenizers add it through a post-processor that no flag describes.
    """
    bos = tokenizer.bos_token_id
    special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bos if bos is not None and special[:1] == [bos] and special[1 : len(plain) + 1] == plain else None


def window_bos(tokenizer: Any, setting: bool | str, key: str) -> int | None:
    """The id every window starts with under ``setting`` (auto, true or false), or None for plain text windows."""
    if setting == "auto":
        return added_bos(tokenizer)
    if not setting:
        return None
    if tokenizer.bos_token_id is None:
        raise ConfigError(key, "true puts BOS first in every window, but the tokenizer has no bos_token; use auto or false")
    return tokenizer.bos_token_id


def with_bos(windows: torch.Tensor, bos: int) -> torch.Tensor:
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_windows(
    docs: list[str], tokenize: Callable[[list[str]], list[list[int]]], nsamples: int, seqlen: int, seed: int,
    key: str = "calibration", log: Callable[[str], None] = print, bos: int | None = None,
) -> tuple[torch.Tensor, str]:
    """``nsamples`` windows of ``seqlen`` tokens, shape (nsamples, seqlen), int64, and where they came from.

    With ``bos``, each window is that id then ``seqlen - 1`` text tokens, drawn as text windows of ``seqlen - 1``.
    """
    if bos is not None:
        windows, origin = calibration_windows(docs, tokenize, nsamples, seqlen - 1, seed, key, log)
        return with_bos(windows, bos), origin
    docs = docs[:MAX_CALIBRATION_DOCS]
    # int32 arrays, tokenized in chunks: Python lists of ints take ~9x the memory (300 MB for 20,000 C4 documents)
    ids = [array("i", t) for i in range(0, len(docs), TOKENIZE_CHUNK) for t in tokenize(docs[i : i + TOKENIZE_CHUNK])]
    rng = random.Random(seed)
    total = sum(len(t) for t in ids)
    if total < nsamples * seqlen:
        raise InputError(f"{key}.dataset: the text has {total} tokens, fewer than nsamples x seqlen = {nsamples * seqlen}; "
                         "give more text or ask for fewer or shorter windows")
    long_docs = sum(len(t) > seqlen for t in ids)
    windows = []
    origin = "documents"
    if long_docs >= nsamples:
        while len(windows) < nsamples:
            t = ids[rng.randint(0, len(ids) - 1)]
            if len(t) <= seqlen:
                continue
            start = rng.randint(0, len(t) - seqlen - 1)
            windows.append(t[start : start + seqlen])
    else:
        stream = array("i")
        for t in ids:
            stream.extend(t)
        log(f"only {long_docs} of {len(ids)} documents exceed {seqlen} tokens (need {nsamples}): "
            "drawing windows from the concatenated token stream")
        origin = "token stream"
        for _ in range(nsamples):
            # Wanda's draw, which never takes the last start; a stream of exactly one window has only that one
            start = rng.randint(0, max(len(stream) - seqlen - 1, 0))
            windows.append(stream[start : start + seqlen])
    return torch.stack([torch.frombuffer(w, dtype=torch.int32) for w in windows]).long(), origin


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over the token stream, tail dropped.

    With ``bos``, each window is that id then the stream's next ``seqlen - 1`` tokens; ``max_tokens`` counts whole
    windows either way, so both protocols score the same number of windows.
    """
    span = seqlen - (bos is not None)
    n = ids.numel() // span
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise InputError(f"eval: the text has {ids.numel()} tokens, fewer than one window of {span} text tokens")
    windows = ids[: n * span].reshape(n, span)
    return windows if bos is None else with_bos(windows, bos)


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(windows, batch_size))


def calibration_batches(cfg: Config, tokenizer: Any, ui: UI) -> tuple[list[torch.Tensor], str]:
    c = cfg.calibration
    bos = window_bos(tokenizer, c.bos, "calibration.bos")
    c.bos = bos is not None  # auto settled: report.json's calibration section and statprune.yaml say what ran
    docs = load_documents(c, "calibration", default_split="train")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    windows, origin = calibration_windows(docs, tokenize, c.nsamples, c.seqlen, c.seed, log=ui.log, bos=bos)
    del docs
    trim_heap()  # tokenizing leaves tens of MB of freed heap that would count in the whole run's peak
    where = f" ({c.data_files})" if c.data_files else ""
    first = " (BOS first)" if c.bos else ""
    return batched(windows, c.batch_size), (f"{c.nsamples} windows x {c.seqlen} tokens{first} from {c.dataset}{where}, "
                                            f"seed {c.seed}, from {origin}")

