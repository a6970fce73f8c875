"""``statprune eval-zeroshot``: lm-evaluation-harness accuracy of a model with the whole model on the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from statprune_cli.config import Config
from statprune_cli.export import write_json_atomic
from statprune_cli.load import load_model, load_tokenizer
from statprune_cli.runtime import setup_runtime
from statprune_cli.ui import UI
from statprune_cli.zeroshot import check_tokenizer, evaluate_zeroshot, prepare_zeroshot


def run_zeroshot(cfg: Config, ui: UI | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``cfg.model`` on the tasks of ``cfg.eval.zeroshot``; the whole model sits on the device.

    A folder written by ``prune`` also gets the result in its report.json, under ``zeroshot``.
    """
    ui = ui or UI()
    device = setup_runtime(cfg)
    prepare_zeroshot(cfg.eval.zeroshot)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer(tokenizer, cfg.model.name_or_path)
    ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
    model = load_model(cfg.model).to(device)
    result = evaluate_zeroshot(model, tokenizer, cfg.eval.zeroshot, ui).to_dict()
    report_path = Path(cfg.model.name_or_path) / "report.json"
    if report_path.is_file():
        write_json_atomic(report_path, {**json.loads(report_path.read_text()), "zeroshot": result})
        ui.log(f"zero-shot result added to {report_path}")
    return {"model": cfg.model.name_or_path, "dtype": cfg.model.dtype, "device": str(device), **result}

