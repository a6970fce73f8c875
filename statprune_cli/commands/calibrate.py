"""``statprune calibrate``: one dense calibration pass; the per-linear statistics go to a file that
``statprune prune --stats`` prunes from with no forward pass."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from statprune_cli.config import Config
from statprune_cli.data import calibration_batches
from statprune_cli.errors import InputError
from statprune_cli.export import write_json_atomic
from statprune_cli.lock import one_writer
from statprune_cli.load import check_against_model, load_model_config, load_tokenizer
from statprune_cli.plan import make_plan
from statprune_cli.runtime import check_world, decide_streaming, reading_engine, setup_runtime
from statprune_cli.stats import ChannelStats, save_stats
from statprune_cli.ui import UI


def run_calibrate(cfg: Config, output: Path, overwrite: bool = False, ui: UI | None = None) -> dict[str, Any]:
    """One dense calibration pass; writes the per-linear statistics and a summary next to them."""
    ui = ui or UI()
    with one_writer(output, ui.log):  # a second calibrate to the same file stops at once
        return calibrate(cfg, output, overwrite, ui)


def calibrate(cfg: Config, output: Path, overwrite: bool, ui: UI) -> dict[str, Any]:
    if output.exists() and not overwrite:
        raise InputError(f"--output: {output} already exists; pass --overwrite to replace it")
    device = setup_runtime(cfg)
    check_against_model(cfg, load_model_config(cfg.model))
    streaming = decide_streaming(cfg)
    tokenizer = load_tokenizer(cfg.model)
    batches, calibration = calibration_batches(cfg, tokenizer, ui)
    check_world(cfg, batches)
    t0 = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg)
    skip = plan.skip_first_tokens
    with reading_engine(cfg, device, streaming, output, ui) as engine:
        stats = engine.statistics(batches, plan.selection(), plan.collect())
    summary = {"stats_file": str(output), "model": cfg.model.name_or_path, "calibration": calibration,
               "skip_first_tokens": skip, "world_size": engine.comm.world_size,
               "seconds": round(time.perf_counter() - t0, 3), "inputs": summarize_stats(stats)}
    if not engine.comm.is_main:  # every process holds the same statistics; rank 0 writes them
        return summary
    save_stats(stats, output, {"model": cfg.model.name_or_path, "calibration": calibration,
                                      "skip_first_tokens": str(skip)})
    summary_path = output.with_suffix(".json")
    write_json_atomic(summary_path, summary)
    summary["summary_file"] = str(summary_path)
    return summary


def summarize_stats(stats: dict[str, ChannelStats], top: int = 5) -> list[dict[str, Any]]:
    """Per distinct linear input (q/k/v share one): the channels with the largest energy and their share."""
    rows: list[dict[str, Any]] = []
    for name, s in stats.items():
        if rows and rows[-1]["_sumsq"] is not None and torch.equal(rows[-1]["_sumsq"], s.sumsq):
            rows[-1]["linears"].append(name)
            continue
        energy = s.sumsq
        values, idx = torch.topk(energy, min(top, energy.numel()))
        rows.append({"linears": [name], "tokens": s.count, "top_channels": idx.tolist(),
                     "top_share": float(values.sum() / energy.sum()) if energy.sum() > 0 else 0.0,
                     "max_abs_mean": float(s.mean.abs().max()), "_sumsq": s.sumsq})
    for r in rows:
        del r["_sumsq"]
    return rows

