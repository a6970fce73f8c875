"""Benchmark on SmolLM2-135M: dense, magnitude, wanda and statprune at 50%, 60%, 2:4 and 4:8.

Calibration: 64 windows x 512 tokens of the C4 sample (seed 0, sequential). Evaluation: the
first 65,536 tokens of the WikiText-2 test split at seqlen 512. Each prune is one
`statprune prune` subprocess (its report gives the prune wall time and the process's peak RSS),
all in this one run, one after another. Results accumulate in bench-out/bench.jsonl (a rerun
with the same protocol skips what is there); docs/results.md is rewritten at the end.

Usage: python scripts/bench.py [--settings 50%,60%,2:4,4:8] [--methods magnitude,wanda,statprune]
                               [--nsamples 64] [--seqlen 512] [--max-tokens 65536]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, common_overrides, ensure_model, load_jsonl, pattern_overrides, run_grid, split_doc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="50%,60%,2:4,4:8")
    ap.add_argument("--methods", default="magnitude,wanda,statprune")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--results", type=Path, default=ROOT / "bench-out" / "bench.jsonl")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    model = ensure_model()
    common = common_overrides(model, args.nsamples, args.seqlen, args.max_tokens, "test")
    key = f"n{args.nsamples}-s{args.seqlen}-e{args.max_tokens}"
    cells = {(method, setting): common + [f"pruning.method={method}"] + pattern_overrides(setting)
             for setting in args.settings.split(",") for method in args.methods.split(",")}
    run_grid(args.results, key, "method", cells, model, args.seqlen, args.max_tokens, "test")
    write_doc(args, key)


def write_doc(args: argparse.Namespace, key: str) -> None:
    rows = [r for r in load_jsonl(args.results) if r["key"] == key]
    settings, methods = args.settings.split(","), args.methods.split(",")
    by = {(r["method"], r["setting"]): r for r in rows}
    dense = by.get(("dense", "-"))
    cmd = (f"python scripts/bench.py --settings {args.settings} --methods {args.methods} --nsamples {args.nsamples} "
           f"--seqlen {args.seqlen} --max-tokens {args.max_tokens}")
    out = [
        "# Results: SmolLM2-135M (Llama architecture, 30 layers)",
        "",
        f"Made by `{cmd}` on 2 CPU cores, float32. Calibration: {args.nsamples} windows x {args.seqlen} tokens of the C4 "
        f"sample, seed 0, sequential. Perplexity: first {args.max_tokens} tokens of the WikiText-2 **test** split, seqlen "
        f"{args.seqlen}. Sparsity is over the pruned linears (every decoder linear; embeddings, norms and the tied head stay dense).",
        "",
        "## Perplexity (lower is better)",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    if dense:
        out.append("| dense | " + " | ".join(f"{dense['ppl']:.2f}" for _ in settings) + " |")
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{by[(m, s)]['ppl']:.2f}" if (m, s) in by else "" for s in settings) + " |")
    out += ["", "## Prune wall time (s) and peak RSS (MiB) of each `statprune prune` process", "",
            "| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{by[(m, s)]['prune_s']:.1f} s, {by[(m, s)]['peak_rss_mib']:.0f} MiB"
                                            if (m, s) in by else "" for s in settings) + " |")
    if all(("wanda", s) in by and ("statprune", s) in by for s in settings):
        out += ["", "statprune / wanda prune wall time: " + ", ".join(
            f"{s} {by[('statprune', s)]['prune_s'] / by[('wanda', s)]['prune_s']:.2f}x" for s in settings)]
    if ("statprune", settings[0]) in by:
        out += ["", f"statprune options: `{by[('statprune', settings[0])]['options']}`"]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    zeroshot = split_doc(args.doc)[1]  # scripts/bench_zeroshot.py's section stays
    args.doc.write_text("\n".join(out) + "\n" + ("\n" + zeroshot if zeroshot else ""))


if __name__ == "__main__":
    main()
