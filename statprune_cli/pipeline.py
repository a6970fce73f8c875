"""The pipeline, read top to bottom: config -> load -> data -> layer-wise engine -> method -> export -> report.

Every check that can fail on bad input runs before the weights load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from statprune_cli.config import Config, dump_config, parse_pattern, parse_size
from statprune_cli.data import batched, calibration_windows, load_documents
from statprune_cli.engine import LayerwiseEngine
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.export import atomic_dir, check_output_dir, save_model_folder, write_json_atomic
from statprune_cli.load import check_against_model, enable_biases, load_model, load_model_config, load_tokenizer
from statprune_cli.methods import Method, Target, build_method
from statprune_cli.perplexity import EvalSet, evaluate_perplexity, load_eval_set
from statprune_cli.report import layer_summary, model_sparsity, package_versions, peak_memory
from statprune_cli.stats import ChannelStats, load_stats, save_stats
from statprune_cli.ui import UI
from statprune_cli.zeroshot import evaluate_zeroshot, prepare_zeroshot


def setup_runtime(cfg: Config) -> torch.device:
    """Apply ``runtime.threads`` and resolve ``runtime.device``: the same for every command."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return resolve_device(cfg.runtime.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("runtime.device", f"{name} asked for, but no CUDA device is available")
    return torch.device(name)


class Timer:
    """Wall time per named phase, for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def statistics_skip(cfg: Config, method: Method) -> int:
    """Positions left out of the statistics: the config's value if set, else the method's own choice."""
    skip = cfg.calibration.skip_first_tokens
    return method.skip_first_tokens if skip is None else skip


def calibration_batches(cfg: Config, tokenizer: Any, ui: UI) -> tuple[list[torch.Tensor], str]:
    c = cfg.calibration
    docs = load_documents(c, "calibration", default_split="train")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    windows, origin = calibration_windows(docs, tokenize, c.nsamples, c.seqlen, c.seed, log=ui.log)
    where = f" ({c.data_files})" if c.data_files else ""
    return batched(windows, c.batch_size), f"{c.nsamples} windows x {c.seqlen} tokens from {c.dataset}{where}, seed {c.seed}, from {origin}"


def eval_sets(cfg: Config, tokenizer: Any) -> list[EvalSet]:
    e = cfg.eval
    return [load_eval_set(tokenizer, d, e.seqlen, e.max_tokens, key=f"eval.datasets[{i}]") for i, d in enumerate(e.datasets)]


def run_prune(cfg: Config, overwrite: bool = False, stats_path: Path | None = None, ui: UI | None = None) -> dict[str, Any]:
    """Prune the model of ``cfg`` and write the output folder; returns the report."""
    ui = ui or UI()
    if not cfg.output.dir:
        raise ConfigError("output.dir", "required: where to write the pruned model (or pass --output)")
    out = Path(cfg.output.dir)
    check_output_dir(out, overwrite)
    device = setup_runtime(cfg)
    timer = Timer()
    p = cfg.pruning
    nm = parse_pattern(p.pattern)
    method = build_method(p.method, p.options)
    skip = statistics_skip(cfg, method)

    with timer.phase("prepare"):
        shapes = check_against_model(cfg, load_model_config(cfg.model))
        if stats_path and method.needs_output_pass:
            raise InputError("--stats: the method's measured compensation needs calibration data; drop --stats or change "
                             "pruning.options.compensation")
        stats = load_stats(stats_path) if stats_path else None
        if stats is not None:
            for name, (_, cols) in shapes.items():
                if name not in stats or stats[name].sum.numel() != cols:
                    raise InputError(f"--stats: {stats_path} has no statistics of {cols} channels for {name}")
        tokenizer = load_tokenizer(cfg.model)
        batches, calibration = None, "none (the method needs no data)"
        if stats is not None:
            calibration = f"statistics from {stats_path}"
        elif method.needs_calibration:
            batches, calibration = calibration_batches(cfg, tokenizer, ui)
        evals = eval_sets(cfg, tokenizer)
        zeroshot = cfg.eval.zeroshot
        if zeroshot.tasks:
            prepare_zeroshot(zeroshot)

    with timer.phase("load"):
        ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
        model = load_model(cfg.model)
        notes = []
        bias_flags = enable_biases(model, list(shapes), cfg.model.trust_remote_code) if method.wants_bias else []
        if bias_flags:
            notes.append(f"set {', '.join(bias_flags)} in config.json: the compensation writes biases")

    target = Target(p.sparsity if nm is None else nm[0] / nm[1], nm, p.granularity)
    if stats is not None:
        mode = f"one-shot: masks from dense-model statistics in {stats_path}, no forward pass"
    elif not method.needs_calibration:
        mode = "data-free: no calibration pass"
    elif p.sequential:
        mode = "sequential: each layer is calibrated on the outputs of the already-pruned layers"
    else:
        mode = "dense-activation: each layer is calibrated on the dense model's activations"
    with timer.phase("prune"):
        engine = LayerwiseEngine(model, device, cfg.runtime.offload_activations, ui)
        result = engine.run(method, lambda name: target, p.targets, p.ignore, batches, stats=stats,
                            sequential=p.sequential, skip_first=skip)
    skipped = sorted({n for layer in result.layers for n, r in layer.linears.items() if "mean_compensation" in r.info})
    if skipped:
        notes.append(f"mean compensation skipped for {len(skipped)} linears whose architecture cannot take a bias "
                     f"(e.g. {skipped[0]})")

    perplexities = []
    with timer.phase("eval"):
        for es in evals:
            ui.log(f"evaluating perplexity on {es.name}")
            perplexities.append(evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict())
    zeroshot_result = None
    if zeroshot.tasks:
        with timer.phase("zeroshot"):
            zeroshot_result = evaluate_zeroshot(model.to(device), tokenizer, zeroshot, ui).to_dict()
    model.to("cpu")

    rows, pruned = layer_summary(result, lambda name: target)
    versions = package_versions()
    report = {
        "statprune_version": versions["statprune"],
        "model": cfg.model.name_or_path,
        "method": p.method,
        "options": asdict(method.options),
        "pattern": p.pattern,
        "pattern_label": p.pattern if nm else f"{p.sparsity:.0%} unstructured (per {p.granularity})",
        "target_sparsity": target.sparsity,
        "mode": mode,
        "calibration": {**asdict(cfg.calibration), "description": calibration,
                        "statistics_skip_first_tokens": None if stats is not None else skip},
        "device": str(device),
        "sparsity": {"pruned_linears": pruned, "all_parameters": model_sparsity(model)},
        "layers": rows,
        "perplexity": perplexities,
        "zeroshot": zeroshot_result,
        "timings": {},
        "memory": {},
        "notes": notes,
        "versions": versions,
        "output_dir": str(out),
    }
    with timer.phase("save"):
        with atomic_dir(out, overwrite) as tmp:
            save_model_folder(tmp, model, tokenizer, parse_size(cfg.output.shard_size, "output.shard_size"))
            (tmp / "statprune.yaml").write_text(dump_config(cfg))
            report["timings"] = {k: round(v, 3) for k, v in timer.phases.items()}
            report["memory"] = peak_memory()
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
    report["timings"]["save"] = round(timer.phases["save"], 3)
    return report


def run_calibrate(cfg: Config, output: Path, overwrite: bool = False, ui: UI | None = None) -> dict[str, Any]:
    """One dense calibration pass; writes the per-linear statistics and a summary next to them."""
    ui = ui or UI()
    if output.exists() and not overwrite:
        raise InputError(f"--output: {output} already exists; pass --overwrite to replace it")
    device = setup_runtime(cfg)
    check_against_model(cfg, load_model_config(cfg.model))
    tokenizer = load_tokenizer(cfg.model)
    batches, calibration = calibration_batches(cfg, tokenizer, ui)
    t0 = time.perf_counter()
    model = load_model(cfg.model)
    engine = LayerwiseEngine(model, device, cfg.runtime.offload_activations, ui)
    p = cfg.pruning
    skip = statistics_skip(cfg, build_method(p.method, p.options))
    result = engine.run(None, lambda name: Target(0.0), p.targets, p.ignore, batches, skip_first=skip)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_stats(result.stats, output, {"model": cfg.model.name_or_path, "calibration": calibration,
                                      "skip_first_tokens": str(skip)})
    summary = {"stats_file": str(output), "model": cfg.model.name_or_path, "calibration": calibration,
               "skip_first_tokens": skip,
               "seconds": round(time.perf_counter() - t0, 3), "inputs": summarize_stats(result.stats)}
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


def run_eval(cfg: Config, ui: UI | None = None) -> list[dict[str, Any]]:
    """Perplexity of ``cfg.model`` on every data set of ``cfg.eval``."""
    ui = ui or UI()
    device = setup_runtime(cfg)
    config = load_model_config(cfg.model)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and cfg.eval.seqlen > context:
        raise ConfigError("eval.seqlen", f"expected at most the model's context ({context} tokens), got {cfg.eval.seqlen}")
    tokenizer = load_tokenizer(cfg.model)
    sets = eval_sets(cfg, tokenizer)
    model = load_model(cfg.model)
    engine = LayerwiseEngine(model, device, cfg.runtime.offload_activations, ui)
    return [evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict() for es in sets]


def run_zeroshot(cfg: Config, ui: UI | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``cfg.model`` on the tasks of ``cfg.eval.zeroshot``; the whole model sits on the device.

    A folder written by ``prune`` also gets the result in its report.json, under ``zeroshot``.
    """
    ui = ui or UI()
    device = setup_runtime(cfg)
    prepare_zeroshot(cfg.eval.zeroshot)
    tokenizer = load_tokenizer(cfg.model)
    ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
    model = load_model(cfg.model).to(device)
    result = evaluate_zeroshot(model, tokenizer, cfg.eval.zeroshot, ui).to_dict()
    report_path = Path(cfg.model.name_or_path) / "report.json"
    if report_path.is_file():
        write_json_atomic(report_path, {**json.loads(report_path.read_text()), "zeroshot": result})
        ui.log(f"zero-shot result added to {report_path}")
    return {"model": cfg.model.name_or_path, "dtype": cfg.model.dtype, "device": str(device), **result}
