"""Map the local files' layouts onto the fields the stock lm-eval prompts read (``process_docs`` of the task YAMLs).

Only field names and nesting change here; the prompts, choices and metrics stay lm-eval's own.
"""

from __future__ import annotations

from typing import Any

import datasets


def _remap(dataset: datasets.Dataset, fn: Any) -> datasets.Dataset:
    """Replace every column by ``fn(doc)``'s, so a nested column can become a flat one of the same name."""
    return dataset.map(fn, remove_columns=dataset.column_names)


def boolq(dataset: datasets.Dataset) -> datasets.Dataset:
    """The derived file stores ``label`` as true/false; the hub's is the index into ["no", "yes"]."""
    return dataset.cast_column("label", datasets.Value("int64"))


def rte(dataset: datasets.Dataset) -> datasets.Dataset:
    """SuperGLUE's field names and string labels -> GLUE's (``sentence1``, ``sentence2``, 0 = entailment)."""
    return _remap(dataset, lambda d: {"sentence1": d["premise"], "sentence2": d["hypothesis"],
                                      "label": {"entailment": 0, "not_entailment": 1}[d["label"]]})


def hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """The text export holds the joined context; lm-eval's own ``preprocess`` then cleans query and endings."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return _remap(dataset, lambda d: {"query": preprocess(d["ctx_with_activity_label"]),
                                      "choices": [preprocess(e) for e in d["endings"]],
                                      "gold": int(d["label"]), "label": str(d["label"])})


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2's nested ``question.{stem, choices[]}`` -> the hub's ``question`` string and ``choices.{text, label}``."""
    return _remap(dataset, lambda d: {"question": d["question"]["stem"], "choices": _choices(d["question"]),
                                      "answerKey": d["answerKey"]})


def openbookqa(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2's nested ``question.{stem, choices[]}`` -> the hub's ``question_stem`` and ``choices.{text, label}``."""
    return _remap(dataset, lambda d: {"question_stem": d["question"]["stem"], "choices": _choices(d["question"]),
                                      "answerKey": d["answerKey"]})

