import json
from pathlib import Path

import pytest
import torch
from conftest import random_text, tiny_tokenizer

from statprune_cli.config import DataConfig
from statprune_cli.data import calibration_windows, eval_text, eval_windows, load_documents
from statprune_cli.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tokenize(texts: list[str]) -> list[list[int]]:
    return tiny_tokenizer()(texts, add_special_tokens=False)["input_ids"]


def test_windows_are_reproducible_and_come_from_long_documents() -> None:
    docs = [random_text(n, seed=i) for i, n in enumerate([10, 200, 300, 15, 250, 400])]
    a, origin = calibration_windows(docs, tokenize, 3, 64, seed=0, log=lambda m: None)
    b, _ = calibration_windows(docs, tokenize, 3, 64, seed=0, log=lambda m: None)
    c, _ = calibration_windows(docs, tokenize, 3, 64, seed=1, log=lambda m: None)
    assert origin == "documents" and a.shape == (3, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    streams = [torch.tensor(t) for t in tokenize(docs) if len(t) > 64]
    for w in a:  # every window is a contiguous slice of one long document
        assert any(torch.equal(s[i : i + 64], w) for s in streams for i in range(len(s) - 63))


def test_too_few_long_documents_fall_back_to_the_token_stream() -> None:
    docs = [random_text(30, seed=i) for i in range(10)]
    logs = []
    w, origin = calibration_windows(docs, tokenize, 4, 64, seed=0, log=logs.append)
    assert origin == "token stream" and w.shape == (4, 64)
    assert "concatenated token stream" in logs[0]


def test_too_little_text_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="has 200 tokens, fewer than nsamples x seqlen = 256"):
        calibration_windows([random_text(200)], tokenize, 4, 64, seed=0, log=lambda m: None)


def test_eval_windows_drop_the_tail_and_respect_max_tokens() -> None:
    ids = torch.arange(1000)
    assert eval_windows(ids, 64, None).shape == (15, 64)
    w = eval_windows(ids, 64, 200)
    assert w.shape == (3, 64) and torch.equal(w[1], torch.arange(64, 128))
    with pytest.raises(InputError, match="fewer than one window"):
        eval_windows(torch.arange(10), 64, None)


def test_jsonl_source_and_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"body": "c"}) + "\n")
    with pytest.raises(InputError, match="no column 'text'"):
        load_documents(DataConfig(dataset=f"jsonl:{f}"), "calibration", "train")
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"body": "a b"}) + "\n" + json.dumps({"body": "c"}) + "\n")
    assert load_documents(DataConfig(dataset=f"jsonl:{good}", text_column="body"), "k", "train") == ["a b", "c"]


@pytest.mark.skipif(not (SHARED / "wikitext-2-raw").is_dir(), reason="shared data not present")
def test_wikitext2_local_rows_match_the_hub_layout() -> None:
    text = eval_text(DataConfig(dataset="wikitext2", data_files=str(SHARED / "wikitext-2-raw"), split="test"), "eval")
    assert len(text) == 1_294_336  # the joined length of the hub's test rows (shared/data/README.md)


@pytest.mark.skipif(not (SHARED / "c4").is_dir(), reason="shared data not present")
def test_c4_local_sample() -> None:
    docs = load_documents(DataConfig(dataset="c4", data_files=str(SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl")), "calibration", "train")
    assert len(docs) == 1000 and all(isinstance(d, str) for d in docs)
