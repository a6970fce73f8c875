"""``statprune sweep``: every method at every sparsity on one model, one set of calibration windows, one evaluation.

Everything the cells share is done once: the windows are drawn and tokenized, the evaluation text
is tokenized, the model is loaded and the dense perplexity measured. Each cell prunes a fresh copy
of the dense model. Cells calibrated on the dense model's activations (``pruning.sequential: false``,
or the method's own choice when the key is unset) share dense statistics collected once (that is
what a dense-activation run computes anyway); sequential cells need their own pass, since each
method's pruned layers feed the next layer differently. A cell that fails records its error and
the sweep goes on.

Outputs, written together into one folder: ``sweep.json``, ``sweep.md`` (rows methods, columns
settings: perplexity and prune wall time) and ``sweep.png`` (perplexity per setting, one line per
method, log scale, dense as a horizontal line) when matplotlib is installed. Until then each finished cell
is kept in ``OUTPUT.partial.json`` (same layout as sweep.json), so a sweep cut short by a time limit loses
only the cell it was in.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from statprune_cli.config import Config
from statprune_cli.data import calibration_batches
from statprune_cli.distributed import launched_world_size
from statprune_cli.engine import LayerwiseEngine
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.export import atomic_dir, check_output_dir, write_json_atomic
from statprune_cli.load import check_against_model, load_model, load_model_config, load_tokenizer
from statprune_cli.perplexity import EvalSet, eval_sets, perplexities
from statprune_cli.plan import make_plan
from statprune_cli.prepasses import DenseStats
from statprune_cli.pruning import PruneInputs, config_method, needs_batches, prune_model
from statprune_cli.report import package_versions, strict_json
from statprune_cli.runtime import setup_runtime
from statprune_cli.sweep_grid import Cell, plan_cells, sweep_table, write_plot
from statprune_cli.ui import UI
from statprune_cli.zeroshot import evaluate_zeroshot, prepare_zeroshot


def run_sweep(cfg: Config, methods: list[str], settings: list[str], output: Path, overwrite: bool = False,
              ui: UI | None = None, zeroshot: bool = False) -> dict[str, Any]:
    """``zeroshot``: also the mean zero-shot accuracy of every cell, on the tasks of ``eval.zeroshot``."""
    ui = ui or UI()
    if launched_world_size() > 1:
        raise InputError("sweep: runs in one process; start it without torchrun or accelerate launch")
    check_output_dir(output, overwrite, "--output")
    cells = plan_cells(cfg, methods, settings)
    if zeroshot:
        if not cfg.eval.zeroshot.tasks:
            raise ConfigError("eval.zeroshot.tasks", "--zeroshot needs the tasks to score (e.g. --set 'eval.zeroshot.tasks=[boolq, rte]')")
        prepare_zeroshot(cfg.eval.zeroshot)
    dense = Dense.prepare(cfg, cells, zeroshot, ui)
    partial = output.with_name(output.name + ".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)  # an earlier sweep's, cut short
    to_run = [c for c in cells if not c.not_applicable]
    with ui.progress("sweep cells", len(to_run)) as advance:
        for c in to_run:
            run_cell(c, dense, ui)
            write_json_atomic(partial, dense.summary(methods, cells))  # a sweep cut short keeps its finished cells
            advance()
    result = dense.summary(methods, cells)
    with atomic_dir(output, overwrite, "--output") as tmp:
        (tmp / "sweep.json").write_text(strict_json(result))
        (tmp / "sweep.md").write_text(sweep_table(result))
        result["plot"] = write_plot(result, tmp / "sweep.png")
    partial.unlink(missing_ok=True)
    result["output_dir"] = str(output)
    return result


@dataclass
class Dense:
    """What the cells share: the dense model and its scores, the windows, the evaluation sets, the dense statistics."""

    cfg: Config
    device: torch.device
    tokenizer: Any
    batches: list[torch.Tensor] | None
    calibration: str
    evals: list[EvalSet]
    model: torch.nn.Module
    stats: DenseStats
    perplexity: list[float] | None = None
    zeroshot: bool = False
    zeroshot_mean: float | None = None

    @classmethod
    def prepare(cls, cfg: Config, cells: list[Cell], zeroshot: bool, ui: UI) -> Dense:
        """Checks every cell against the model, draws the windows, loads and scores the dense model."""
        device = setup_runtime(cfg)
        model_config = load_model_config(cfg.model)
        for c in cells:
            check_against_model(c.cfg, model_config)
        tokenizer = load_tokenizer(cfg.model)
        batches, calibration = None, "none (no method needs data)"
        if any(needs_batches(c.cfg, config_method(c.cfg)) for c in cells if not c.not_applicable):
            batches, calibration = calibration_batches(cfg, tokenizer, ui)
        evals = eval_sets(cfg, tokenizer)
        ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
        model = load_model(cfg.model)
        dense = cls(cfg, device, tokenizer, batches, calibration, evals, model,
                    DenseStats(make_plan(cfg).selection(), batches, ui), zeroshot=zeroshot)
        engine = LayerwiseEngine(model, device, cfg.runtime.offload_activations, ui)
        dense.perplexity = [r["perplexity"] for r in perplexities(cfg, engine, evals, ui)]
        model.to("cpu")
        dense.zeroshot_mean = dense.accuracy(model, ui)
        return dense

    def accuracy(self, model: torch.nn.Module, ui: UI) -> float | None:
        """Mean zero-shot accuracy of ``model`` when the sweep asks for it; the model goes back to the CPU."""
        if not self.zeroshot:
            return None
        acc = evaluate_zeroshot(model.to(self.device), self.tokenizer, self.cfg.eval.zeroshot, ui).mean
        model.to("cpu")
        return acc

    def summary(self, methods: list[str], cells: list[Cell]) -> dict[str, Any]:
        """sweep.json (and the partial file while cells run)."""
        return {
            "model": self.cfg.model.name_or_path,
            "calibration": self.calibration,
            "sequential": self.cfg.pruning.sequential,
            "profile": self.cfg.pruning.profile,
            "datasets": [es.name for es in self.evals],
            "dense": self.perplexity,
            "dense_zeroshot_mean_acc": self.zeroshot_mean,
            "shared_dense_seconds": round(self.stats.seconds, 3),
            "methods": methods,
            "settings": [c.setting for c in cells[:: len(methods)]],
            "cells": [c.to_dict() for c in cells],
            "versions": package_versions(),
        }


def run_cell(c: Cell, dense: Dense, ui: UI) -> None:
    """Prune a fresh copy of the dense model for one cell and score it; a failing cell records its error."""
    ui.log(f"{c.method} at {c.setting}")
    model = copy.deepcopy(dense.model)
    try:
        method = config_method(c.cfg)
        t0, shared_before = time.perf_counter(), dense.stats.seconds
        inputs = PruneInputs(c.cfg, make_plan(c.cfg, method), method, dense.batches)
        pruned = prune_model(inputs, model, dense.device, ui, dense=dense.stats, shared=True)
        # the shared statistics' pass is the sweep's, not this cell's
        c.prune_seconds = round(time.perf_counter() - t0 - (dense.stats.seconds - shared_before), 3)
        c.shared_stats = pruned.from_shared_stats
        c.layer_sparsity = pruned.layer_sparsity
        c.perplexity = [r["perplexity"] for r in perplexities(c.cfg, pruned.engine, dense.evals, ui)]
        linears = [r for layer in pruned.result.layers for r in layer.linears.values()]
        numel = sum(r.shape[0] * r.shape[1] for r in linears)
        c.sparsity = sum(r.zeros for r in linears) / numel if numel else 0.0
        c.zeroshot_mean = dense.accuracy(model, ui)
        ui.log(f"{c.method} at {c.setting}: perplexity " + ", ".join(f"{p:.2f}" for p in c.perplexity)
               + f" ({c.prune_seconds:.1f} s)")
    except Exception as e:  # one failing cell must not lose the others
        c.error = f"{type(e).__name__}: {e}"
        ui.log(f"{c.method} at {c.setting} failed: {c.error}")
    del model
