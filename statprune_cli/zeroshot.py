"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory model, offline when local task files are given.

With ``eval.zeroshot.data_dir`` (or ``--data-dir``, or ``$STATPRUNE_ZEROSHOT_DATA``), each task is lm-eval's stock
task (its prompt, choices and metrics, 0-shot) with the data set swapped for local files, as described by the
YAML files in ``statprune_cli/zeroshot_tasks/``; the hub is switched off for the run. Without a data folder the
stock tasks download their data from the hub as usual.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from statprune_cli.config import ZeroShotConfig, check_zeroshot_data_dir, validate_zeroshot
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.ui import UI

TASK_DIR = Path(__file__).parent / "zeroshot_tasks"
DATA_ENV = "STATPRUNE_ZEROSHOT_DATA"
STATPRUNE_KEYS = ("stock", "caveat", "labels_file")  # the task YAMLs' own keys; the rest is lm-eval's
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass
class TaskScore:
    task: str
    acc: float
    acc_stderr: float
    acc_norm: float | None  # None for tasks whose stock metrics are acc alone (boolq, rte, winogrande)
    acc_norm_stderr: float | None
    n: int
    caveat: str | None = None


@dataclass
class ZeroShotResult:
    """Per-task scores and their mean; ``mean`` is the number pruning papers put in their tables (acc)."""

    tasks: list[TaskScore]
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = "hub"
    limit: int | None = None
    lm_eval_version: str = ""

    @property
    def mean(self) -> float:
        return sum(t.acc for t in self.tasks) / len(self.tasks)

    @property
    def mean_acc_norm(self) -> float | None:
        norms = [t.acc_norm for t in self.tasks if t.acc_norm is not None]
        return sum(norms) / len(norms) if norms else None

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [asdict(t) for t in self.tasks], "mean_acc": self.mean, "mean_acc_norm": self.mean_acc_norm,
                "skipped": self.skipped, "source": self.source, "limit": self.limit, "num_fewshot": 0,
                "lm_eval_version": self.lm_eval_version}


@dataclass
class PreparedTasks:
    """What lm-eval gets: task names (hub) or full task configs (local files), and what was left out and why."""

    specs: list[str | dict[str, Any]]
    caveats: dict[str, str | None]
    skipped: dict[str, str]
    data_dir: Path | None


def require_lm_eval() -> str:
    """lm-eval's version, or a one-line error saying what to install."""
    if importlib.util.find_spec("lm_eval") is None:
        raise InputError("eval.zeroshot: needs lm-evaluation-harness, which is not installed; pip install 'statprune[eval]'")
    return importlib.metadata.version("lm_eval")


def resolve_data_dir(zc: ZeroShotConfig) -> tuple[Path | None, str]:
    """The local task folder (config key, else the environment variable) and the name to blame if it is wrong."""
    if zc.data_dir:
        return Path(zc.data_dir), "eval.zeroshot.data_dir"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), DATA_ENV
    return None, ""


def _load_yaml(path: Path) -> dict[str, Any]:
    """lm-eval's own YAML loader: it follows ``include`` and resolves ``!function`` next to the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)


def local_task_config(task: str, data_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The stock task's config with its data set replaced by the local files; raises FileNotFoundError naming a missing one."""
    import lm_eval.tasks

    local = _load_yaml(TASK_DIR / f"{task}.yaml")
    stock = _load_yaml(Path(lm_eval.tasks.__file__).parent / local["stock"])
    files = {split: data_dir / rel for split, rel in local["dataset_kwargs"]["data_files"].items()}
    labels_path = data_dir / local["labels_file"] if "labels_file" in local else None
    for path in [*files.values(), labels_path]:
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"no file {path.relative_to(data_dir)} in {data_dir}")
    cfg = {**stock, **{k: v for k, v in local.items() if k not in STATPRUNE_KEYS}}
    cfg["dataset_kwargs"] = {"data_files": {split: str(p) for split, p in files.items()}}
    if labels_path is not None:
        labels = [int(line) for line in labels_path.read_text().split()]
        cfg["process_docs"] = functools.partial(_add_labels, labels=labels, source=labels_path)
    return cfg, local.get("caveat")


def _add_labels(dataset: Any, labels: list[int], source: Path) -> Any:
    """``process_docs`` for a task whose labels lie in a separate file, one per line in example order (PIQA)."""
    if len(labels) != len(dataset):
        raise InputError(f"{source}: expected one label per example ({len(dataset)}), found {len(labels)}")
    return dataset.add_column("label", labels)


def prepare_zeroshot(zc: ZeroShotConfig) -> PreparedTasks:
    """Every check that needs no model: lm-eval installed, task names, the data folder and each task's files."""
    validate_zeroshot(zc)
    require_lm_eval()
    data_dir, key = resolve_data_dir(zc)
    if data_dir is None:
        return PreparedTasks(list(zc.tasks), {t: None for t in zc.tasks}, {}, None)
    check_zeroshot_data_dir(data_dir, key)
    specs, caveats, skipped = [], {}, {}
    for task in zc.tasks:
        try:
            cfg, caveats[task] = local_task_config(task, data_dir)
        except FileNotFoundError as e:
            skipped[task] = str(e)
            continue
        specs.append(cfg)
    if not specs:
        raise ConfigError(key, f"none of the tasks {', '.join(zc.tasks)} has its files in {data_dir}")
    return PreparedTasks(specs, caveats, skipped, data_dir)


@contextlib.contextmanager
def hub_offline(active: bool) -> Iterator[None]:
    """Local task files: no request may reach the hub, whatever the environment says."""
    if not active:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tokenizer(tokenizer: Any, name: str) -> None:
    """lm-eval ends every request with the EOS token: a tokenizer without one fails inside it with a TypeError."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise InputError(f"model.name_or_path: the tokenizer of {name} has no EOS token, which lm-eval's zero-shot "
                         "tasks need; set eos_token in its tokenizer_config.json")


def _score(task: str, metrics: dict[str, Any], n: int, caveat: str | None) -> TaskScore:
    def get(name: str) -> float | None:
        value = metrics.get(f"{name},none")
        return None if value is None or value == "N/A" else float(value)

    return TaskScore(task, get("acc"), get("acc_stderr"), get("acc_norm"), get("acc_norm_stderr"), n, caveat)


def evaluate_zeroshot(model: nn.Module, tokenizer: Any, zc: ZeroShotConfig, ui: UI | None = None) -> ZeroShotResult:
    """0-shot accuracy of ``model`` as it is in memory (weights and device) on the tasks of ``zc``."""
    ui = ui or UI()
    prepared = prepare_zeroshot(zc)
    check_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
    version = require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR if ui.quiet else logging.WARNING)
    local = prepared.data_dir is not None
    for task, why in prepared.skipped.items():
        ui.log(f"zero-shot: skipping {task}: {why}")
    ui.log(f"zero-shot: {', '.join(t for t in zc.tasks if t not in prepared.skipped)} "
           f"({'local files in ' + str(prepared.data_dir) if local else 'hub data'}, limit {zc.limit})")
    # HFLM may give the tokenizer a pad token; the tokenizer saved with the model must stay as it was.
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=zc.batch_size)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hub_offline(local))
        if ui.quiet:  # lm-eval and datasets draw their own progress bars on stderr; --quiet silences them too
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        out = lm_eval.simple_evaluate(model=lm, tasks=prepared.specs, num_fewshot=0, limit=zc.limit, log_samples=False,
                                      task_manager=TaskManager(include_defaults=not local))
    scores = [_score(t, out["results"][t], int(out["n-samples"][t]["effective"]), prepared.caveats.get(t))
              for t in zc.tasks if t in out["results"]]
    return ZeroShotResult(scores, prepared.skipped, str(prepared.data_dir) if local else "hub", zc.limit, version)
