"""The GPU benchmark's cells, for scripts/gpu_check.sh: one process per phase, one JSON line per finished cell.

  prune  one model, each method at each setting: `statprune prune --json` in this process, one cell after another;
         each cell appends its prune time, CUDA peak memory and perplexity to OUT/prune.jsonl as soon as it ends, so
         a phase stopped by its time budget keeps the cells it finished. The 2:4 outputs stay under WORK for `speed`.
  speed  `statprune eval-speed --json` on a model's kept 2:4 outputs, one line each in OUT/speed.jsonl.
  table  the Markdown tables of both files (OUT/tables.md), for docs/results.

Cells share a process because each process pays the imports and CUDA's start-up again (docs/results.md, GPU: 26 s per
process around an 8.4 s prune); the CUDA peak is reset before each cell, and the libraries are started before the
first so that it does not pay their initialization in its prune time.

Usage: python scripts/gpu_bench.py prune KEY MODEL --out OUT --work WORK [--settings 2:4,4:8,50%]
           [--methods wanda,statprune,statprune-paper,sparsegpt] [--no-eval] [--device cuda] [--dry-run]
       python scripts/gpu_bench.py speed KEY --out OUT --work WORK [--methods statprune] [EVAL_SPEED_OPTION ...]
       python scripts/gpu_bench.py table --out OUT
A method NAME-PRESET runs NAME with pruning.options.preset=PRESET (statprune-paper).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from typer.main import get_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import BASE_CONFIG, append_jsonl, commit, load_jsonl, method_overrides, pattern_overrides  # noqa: E402

from statprune_cli.cli import app  # noqa: E402
from statprune_cli.speed import table_rows  # noqa: E402

CLI = get_command(app)
try:
    CHECKOUT = commit()
except OSError:  # no git on the machine
    CHECKOUT = "unknown"
C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"


def statprune(args: list[str]) -> tuple[int, Any, str]:
    """`statprune ARGS --json --quiet` in this process: exit code, the parsed report (None without one), stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = CLI.main([*args, "--json", "--quiet"], prog_name="statprune", standalone_mode=False) or 0
        except click.ClickException as e:  # a usage error: an option or a value this checkout does not know
            e.show()
            rc = e.exit_code
    return rc, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def cell_overrides(label: str) -> list[str]:
    """'statprune-paper' -> statprune's flags plus pruning.options.preset=paper."""
    method, _, preset = label.partition("-")
    return method_overrides(method) + ([f"pruning.options.preset={preset}"] if preset else [])


def slug(setting: str) -> str:
    return setting.replace(":", "of").replace("%", "pct")


def output_dir(work: Path, key: str, label: str, setting: str) -> Path:
    return work / f"{key}-{label}-{slug(setting)}"


def start_cuda() -> None:
    """cuBLAS and cuSOLVER handles, created on first use, cost the first cell otherwise."""
    a = torch.randn(256, 256, device="cuda")
    torch.linalg.cholesky(a @ a.T + 256 * torch.eye(256, device="cuda"))
    (a.bfloat16() @ a.bfloat16()).sum().item()


def prune_phase(args: argparse.Namespace) -> None:
    data = args.data.resolve()
    wiki = f"eval.datasets=[{{dataset: wikitext2, data_files: '{data / 'wikitext-2-raw'}', split: test}}]"
    common = [f"model.name_or_path={args.model}", "model.gguf_file=null", f"model.dtype={args.dtype}",
              f"runtime.device={args.device}", f"calibration.data_files={data / C4}", f"calibration.nsamples={args.nsamples}",
              f"calibration.seqlen={args.seqlen}", f"eval.seqlen={args.seqlen}", f"eval.max_tokens={args.eval_tokens}",
              wiki if args.eval else "eval.datasets=[]"]
    cells = [(setting, label, [*common, *cell_overrides(label), *pattern_overrides(setting)])
             for setting in args.settings.split(",") for label in args.methods.split(",")]
    if args.dry_run:
        for setting, label, flags in cells:
            print(f"   {args.key} {label} {setting}: statprune prune {BASE_CONFIG.name} " + " ".join(f"--set {f}" for f in flags))
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        start_cuda()
    for setting, label, flags in cells:
        out = output_dir(args.work, args.key, label, setting)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        rc, report, err = statprune(["prune", str(BASE_CONFIG), "--overwrite", "-o", str(out),
                                     *[a for f in flags for a in ("--set", f)]])
        row: dict[str, Any] = {"model": args.key, "method": label, "setting": setting, "rc": rc,
                               "wall_s": round(time.perf_counter() - start, 1)}
        if report:
            ppl = report["perplexity"][0]["perplexity"] if report["perplexity"] else None
            row |= {"prune_s": report["timings"]["prune"], "cuda_max_mib": report["memory"]["cuda_max_allocated_mib"],
                    "ppl": ppl, "sparsity": report["sparsity"]["pruned_linears"]["sparsity"], "mode": report["mode"]}
        else:
            row["error"] = last_line(err)
        row |= {"nsamples": args.nsamples, "seqlen": args.seqlen, "dtype": args.dtype, "device": device_name(args.device),
                "commit": CHECKOUT}
        append_jsonl(args.out / "prune.jsonl", row)
        print(f"   {args.key:8} {label:16} {setting:>4}  " + (
            f"prune {row['prune_s']:7.1f} s  CUDA max {fmt(row['cuda_max_mib'], '7.0f')} MiB  ppl {fmt(row['ppl'], '.3f')}"
            if report else f"exit {rc}: {row['error']}"), flush=True)
        if setting != args.keep:
            shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def speed_phase(args: argparse.Namespace, options: list[str]) -> None:
    for label in args.methods.split(","):
        folder = output_dir(args.work, args.key, label, "2:4")
        if args.dry_run:
            print(f"   {args.key} {label}: statprune eval-speed {folder} {' '.join(options)}")
            continue
        if not folder.is_dir():
            print(f"   {args.key} {label}: no 2:4 output at {folder} (its prune did not finish); skipped", flush=True)
            continue
        rc, report, err = statprune(["eval-speed", str(folder), *options])
        row = {"model": args.key, "method": label, "rc": rc, "speed": report, "commit": CHECKOUT}
        if not report:
            row["error"] = last_line(err)
        append_jsonl(args.out / "speed.jsonl", row)
        if report:
            for measure, dense, sparse, speedup in table_rows(report):
                print(f"   {args.key:8} {label:16} {measure:40} {dense:>20} {sparse:>20} {speedup:>7}", flush=True)
            c = report["check"]
            print(f"   {args.key:8} {label:16} logits: relative L2 {fmt(c['rel_l2'], '.2e')}, ok: {c['ok']}", flush=True)
        else:
            print(f"   {args.key} {label}: exit {rc}: {row['error']}", flush=True)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def tables(out: Path) -> str:
    """Prune rows (with each cell's prune time over Wanda's at the same model and setting), then speed rows."""
    prune = load_jsonl(out / "prune.jsonl")
    wanda = {(r["model"], r["setting"]): r["prune_s"] for r in prune if r["method"] == "wanda" and r.get("prune_s")}
    speed = load_jsonl(out / "speed.jsonl")
    runs = {(r["device"], r["dtype"], r["nsamples"], r["seqlen"], r["commit"]) for r in prune}
    runs |= {(r["speed"]["device"], r["speed"]["dtype"], None, None, r["commit"]) for r in speed if r["speed"]}
    lines = [f"Ran on {device} in {dtype}" + (f", calibration {n} x {s} tokens" if n else ", eval-speed") + f", commit {c}."
             for device, dtype, n, s, c in sorted(runs, key=str)]
    lines += ["", "| model | method | setting | prune | x Wanda | CUDA max allocated | perplexity |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in prune:
        if "prune_s" not in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['setting']} | exit {r['rc']}: {r.get('error', '')} | | | |")
            continue
        base = wanda.get((r["model"], r["setting"]))
        lines.append(f"| {r['model']} | {r['method']} | {r['setting']} | {r['prune_s']:.1f} s | "
                     f"{fmt(r['prune_s'] / base if base else None, '.2f')} | {fmt(r['cuda_max_mib'], '.0f')} MiB | "
                     f"{fmt(r['ppl'], '.3f')} |")
    lines += ["", "| model | method | measure | dense | 2:4 sparse | speedup |", "|---|---|---|---:|---:|---:|"]
    for r in speed:
        if not r["speed"]:
            lines.append(f"| {r['model']} | {r['method']} | exit {r['rc']}: {r.get('error', '')} | | | |")
            continue
        lines += [f"| {r['model']} | {r['method']} | {' | '.join(cells)} |" for cells in table_rows(r["speed"])]
        c = r["speed"]["check"]
        lines.append(f"| {r['model']} | {r['method']} | logits, relative L2 | | {fmt(c['rel_l2'], '.2e')} | "
                     f"{'ok' if c['ok'] else 'too far'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("prune")
    p.add_argument("key")
    p.add_argument("model")
    p.add_argument("--settings", default="2:4,4:8,50%")
    p.add_argument("--methods", default="wanda,statprune,statprune-paper,sparsegpt")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="no perplexity (a random-weight checkpoint)")
    p.add_argument("--keep", default="2:4", help="the setting whose outputs stay for `speed`")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=32768)
    s = sub.add_parser("speed")
    s.add_argument("key")
    s.add_argument("--methods", default="statprune")
    for q in (p, s):
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--work", type=Path, required=True)
        q.add_argument("--dry-run", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path, required=True)
    args, rest = ap.parse_known_args()
    if args.phase == "table":
        text = tables(args.out)
        (args.out / "tables.md").write_text(text)
        print(text, end="")
        return
    if rest and args.phase != "speed":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "prune":
        prune_phase(args)
    else:
        speed_phase(args, rest)


if __name__ == "__main__":
    main()
