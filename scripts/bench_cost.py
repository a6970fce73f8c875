"""Pruning cost side by side: every method's prune wall time on SmolLM2-135M and on a synthetic checkpoint of
realistic width (Llama architecture, hidden 4096, intermediate 11008, 4 layers, random weights: the time
does not depend on the values), with the same calibration windows for every method of a model.

SparseGPT's extra work (Gram matrices, a Cholesky inverse per linear, the column-by-column update) grows
with width while Wanda-cost methods only add elementwise work, so the ratio statprune / sparsegpt is the
figure to watch. Each prune is one `statprune prune` subprocess with no evaluation, one after another in
this run; the report's `timings.prune` is the time. Results go to bench-out/cost.jsonl and
docs/results/cost.md.

Usage: python scripts/bench_cost.py [--methods wanda,sparsegpt,ria,statprune] [--nsamples 8] [--seqlen 512]
                                    [--models smollm2,wide] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, append_jsonl, common_overrides, ensure_model, load_jsonl, prune, synthetic_llama, write_section  # noqa: E402

WIDE = ROOT / "models" / "synthetic-llama-h4096-l4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="wanda,sparsegpt,ria,statprune")
    ap.add_argument("--models", default="smollm2,wide")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--results", type=Path, default=ROOT / "bench-out" / "cost.jsonl")
    args = ap.parse_args()
    small = ensure_model()
    paths = {"smollm2": small, "wide": synthetic_llama(WIDE, 4096, 11008, 4, small)}
    key = f"n{args.nsamples}-s{args.seqlen}"
    done = {(r["key"], r["model"], r["method"], r["repeat"]) for r in load_jsonl(args.results)}
    for rep in range(args.repeats):
        for name in args.models.split(","):
            for method in args.methods.split(","):
                if (key, name, method, rep) in done:
                    continue
                overrides = common_overrides(paths[name], args.nsamples, args.seqlen, args.seqlen, "test")
                overrides += [f"pruning.method={method}", "eval.datasets=[]"]
                r = prune(overrides, ROOT / "bench-out" / "cost-tmp")
                rec = {"key": key, "model": name, "method": method, "repeat": rep, "prune_s": r["timings"]["prune"],
                       "load_s": r["timings"]["load"], "peak_rss_mib": r["memory"]["peak_rss_mib"]}
                append_jsonl(args.results, rec)
                print(f"{name:8} {method:10} prune {rec['prune_s']:8.1f}s  RSS {rec['peak_rss_mib']:.0f} MiB", flush=True)
    write_doc(args, key)


def write_doc(args: argparse.Namespace, key: str) -> None:
    rows = [r for r in load_jsonl(args.results) if r["key"] == key]
    models, methods = args.models.split(","), args.methods.split(",")
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        k = (r["model"], r["method"])
        best[k] = min(best.get(k, float("inf")), r["prune_s"])
    label = {"smollm2": "SmolLM2-135M (hidden 576, 30 layers)", "wide": "synthetic Llama (hidden 4096, 4 layers)"}
    out = ["## Pruning cost", "",
           f"Made by `python scripts/bench_cost.py --methods {args.methods} --models {args.models} --nsamples {args.nsamples} "
           f"--seqlen {args.seqlen} --repeats {args.repeats}` on 2 CPU cores, float32: {args.nsamples} calibration windows x "
           f"{args.seqlen} tokens (the same windows for every method of a model), sequential, no evaluation. Prune wall "
           "time from each run's report (the fastest of the repeats).", "",
           "| model | " + " | ".join(methods) + " | statprune / wanda | statprune / sparsegpt |",
           "|---|" + "---:|" * (len(methods) + 2)]
    for m in models:
        t = {meth: best.get((m, meth)) for meth in methods}
        cells = [f"{t[meth]:.1f} s" if t[meth] else "" for meth in methods]
        ratio = [f"{t['statprune'] / t[d]:.2f}x" if t.get("statprune") and t.get(d) else "" for d in ("wanda", "sparsegpt")]
        out.append(f"| {label.get(m, m)} | " + " | ".join(cells + ratio) + " |")
    write_section("cost", "\n".join(out) + "\n")


if __name__ == "__main__":
    main()
