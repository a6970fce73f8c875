"""The run report: ``report.json`` and the table printed at the end of a run."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import resource
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from statprune_cli import __version__
from statprune_cli.engine import EngineResult
from statprune_cli.masks import count_zeros

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "datasets")


def strict_json(data: Any) -> str:
    """JSON that strict parsers accept (no bare NaN or Infinity): a non-finite number becomes null, and the mapping
    that holds it says which key and what the value was, under ``non_finite``."""

    def clean(value: Any) -> tuple[Any, bool]:
        if isinstance(value, float) and not math.isfinite(value):
            return None, True
        if isinstance(value, dict):
            out, bad = {}, {}
            for k, v in value.items():
                out[k], found = clean(v)
                if found and not isinstance(v, dict):  # a nested mapping names its own
                    bad[k] = repr(v) if isinstance(v, float) else "non-finite numbers, now null"
            if bad:
                out["non_finite"] = bad
            return out, False
        if isinstance(value, (list, tuple)):
            items = [clean(v) for v in value]
            return [v for v, _ in items], any(found for _, found in items)
        return value, False

    return json.dumps(clean(data)[0], indent=2, allow_nan=False)


def package_versions() -> dict[str, str]:
    versions = {"statprune": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_mib() -> float:
    """This process's peak resident memory. /proc's VmHWM first: getrusage's ru_maxrss survives exec, so a
    process started by a large parent (a benchmark script) would report the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory() -> dict[str, float | None]:
    """Peak process RSS and CUDA max allocated, in MiB."""
    rss = peak_rss_mib()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": round(rss, 1), "cuda_max_allocated_mib": None if cuda is None else round(cuda, 1)}


def model_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Zeros over every parameter of the model (tied tensors counted once)."""
    seen, zeros, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        zeros += count_zeros(p)
        total += p.numel()
    return {"zeros": zeros, "parameters": total, "sparsity": zeros / total if total else 0.0}


def layer_summary(result: EngineResult, layer_target: Callable[[int], float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-layer rows and the total over the pruned linears. A row's ``target_sparsity`` is the layer's (OWL's, or
    the run's), which its linears may share out unevenly (``pruning.allocation``); each linear has its own."""
    rows, zeros, numel, before = [], 0, 0, []
    for layer in result.layers:
        lin = {}
        lz, ln = 0, 0
        for name, r in layer.linears.items():
            n = r.shape[0] * r.shape[1]
            lin[name] = {"shape": list(r.shape), "target_sparsity": r.target, "sparsity": r.sparsity, **r.info}
            lz, ln = lz + r.zeros, ln + n
            before.append(r.zeros_before)
        zeros, numel = zeros + lz, numel + ln
        rows.append({"layer": layer.index, "seconds": round(layer.seconds, 4), "target_sparsity": layer_target(layer.index),
                     "sparsity": lz / ln if ln else 0.0, "linears": lin})
    known = None if None in before else sum(before)  # a run resumed from an older version did not count them
    return rows, {"zeros": zeros, "parameters": numel, "sparsity": zeros / numel if numel else 0.0, "zeros_before": known}


def zeros_before_note(totals: dict[str, Any]) -> list[str]:
    """Why a run can read above its target: the checkpoint's own zeros count, and masks that only zero weights keep
    them (an N:M group that already held more than M-N zeros stays above N/M)."""
    before, numel = totals["zeros_before"], totals["parameters"]
    if not before:
        return []
    return [f"{before:,} of the pruned linears' {numel:,} weights ({before / numel:.3%}) were zero before pruning; "
            "they count in the reported sparsity"]


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Per decoder layer: the sparsity of each pruned linear and the time spent; then totals."""
    console = console or Console(stderr=True)
    layers = report.get("layers", [])
    short_names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for row in layers for n in row["linears"]))
    table = Table(title=f"statprune: {report['method']} at {report['pattern_label']}", show_lines=False)
    table.add_column("layer", justify="right")
    for s in short_names:
        table.add_column(s, justify="right")
    per_layer_targets = report.get("layer_target_sparsity") is not None
    if per_layer_targets:
        table.add_column("target", justify="right")
    table.add_column("layer", justify="right")
    table.add_column("time (s)", justify="right")
    for row in layers:
        by_short = {n.rsplit(".", 1)[-1]: v for n, v in row["linears"].items()}
        target = [f"{row['target_sparsity']:.1%}"] if per_layer_targets else []
        table.add_row(str(row["layer"]), *[f"{by_short[s]['sparsity']:.1%}" if s in by_short else "-" for s in short_names],
                      *target, f"{row['sparsity']:.1%}", f"{row['seconds']:.2f}")
    console.print(table)
    s = report["sparsity"]
    console.print(f"sparsity: {s['pruned_linears']['sparsity']:.2%} over the pruned linears "
                  f"({s['pruned_linears']['parameters']:,} weights), {s['all_parameters']['sparsity']:.2%} over all "
                  f"{s['all_parameters']['parameters']:,} parameters")
    console.print(f"mode: {report['mode']}; calibration: {report['calibration']['description']}", markup=False)
    t = report["timings"]
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    m = report["memory"]
    cuda = f", CUDA max allocated {m['cuda_max_allocated_mib']:.0f} MiB" if m["cuda_max_allocated_mib"] is not None else ""
    console.print(f"peak RSS {m['peak_rss_mib']:.0f} MiB{cuda}")
    for ppl in report.get("perplexity", []):
        limit = f", max_tokens={ppl['max_tokens']}" if ppl["max_tokens"] else ""
        first = ", BOS first" if ppl["bos"] else ""
        console.print(f"[bold]{escape(ppl['dataset'])} perplexity {ppl['perplexity']:.4f}[/bold] (seqlen {ppl['seqlen']}, "
                      f"{ppl['windows']} windows{first}, {ppl['tokens']} tokens{limit}, {ppl['dtype']})")
    if report.get("zeroshot"):
        print_zeroshot(report["zeroshot"], console)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {escape(note)}")  # notes name paths and patterns: "[" is text
    if report.get("output_dir"):
        console.print(f"output: {report['output_dir']}", markup=False)


def print_zeroshot(z: dict[str, Any], console: Console) -> None:
    """Per task: acc and acc_norm with their standard errors and the example count; then the means and caveats."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    table = Table(title="zero-shot accuracy (%)")
    for col in ("task", "acc", "± stderr", "acc_norm", "± stderr", "n"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t in z["tasks"]:
        table.add_row(escape(t["task"]) + (" *" if t["caveat"] else ""), pct(t["acc"]), pct(t["acc_stderr"]), pct(t["acc_norm"]),
                      pct(t["acc_norm_stderr"]), str(t["n"]))
    norms = sum(t["acc_norm"] is not None for t in z["tasks"])
    table.add_row(f"mean ({len(z['tasks'])} tasks)", pct(z["mean_acc"]), "", pct(z["mean_acc_norm"]),
                  f"({norms} tasks)" if norms else "", "", style="bold")
    console.print(table)
    limit = f", the first {z['limit']} examples of each task" if z["limit"] else ""
    console.print(f"0-shot, lm-eval {z['lm_eval_version']}{limit}; data: {z['source']}", markup=False)
    for t in z["tasks"]:
        if t["caveat"]:
            console.print(f"* {t['task']}: {t['caveat']}", markup=False)
    for task, why in z["skipped"].items():
        console.print(f"[yellow]skipped:[/yellow] {escape(task)}: {escape(why)}")
