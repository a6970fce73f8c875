"""Benchmark on SmolLM2-135M (--model smollm2) or Qwen2.5-Coder-0.5B-Instruct (--model qwen): dense and every method
at 50%, 60%, 2:4 and 4:8, the same protocol on either.

Method names take the suffixes of ``statprune sweep --methods``: ``+owl`` runs that method with the OWL layer
profile (pruning.profile=owl), ``+owl(m=7)`` sets ``pruning.owl.m`` too; ``+realloc`` adds N:M channel reallocation
(pruning.reallocation).

Calibration: 64 windows x 512 tokens of the C4 sample (seed 0, sequential). Evaluation: the
first 65,536 tokens of the WikiText-2 test split at seqlen 512. Each prune is one
`statprune prune` subprocess (its report gives the prune wall time and the process's peak RSS),
all in this one run, one after another. Results accumulate in docs/results/data/bench.jsonl (a rerun
with the same protocol skips what is there), keyed by model; tables and plot go to out/results/ (bench.md and bench.png; bench-qwen.* for Qwen), and
docs/results.md takes the figures by hand. On 2 cores a Qwen cell takes about 4x a SmolLM2 cell.

Usage: python scripts/bench.py [--model smollm2|qwen] [--settings 50%,60%,2:4,4:8]
                               [--methods magnitude,wanda,sparsegpt,ria,statprune]
                               [--nsamples 64] [--seqlen 512] [--max-tokens 65536]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (DRAFTS, MODELS, RESULTS, common_overrides, ensure_model, load_jsonl, method_overrides,  # noqa: E402
                  pattern_overrides, run_grid, write_section)

from statprune_cli.sweep_grid import write_plot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--settings", default="50%,60%,2:4,4:8")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,ria,statprune")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--results", type=Path, default=RESULTS / "bench.jsonl")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc from the results so far, run nothing")
    ap.add_argument("--section", default="bench",
                    help="name of the docs/results section (and plot) to write; other models than smollm2 add -MODEL")
    ap.add_argument("--timing-note", default="", help="a sentence on how the timings were taken (what ran alone)")
    ap.add_argument("--seed", type=int, default=0,
                    help="calibration seed; other than 0 the cells are only recorded (the tables show seed 0)")
    args = ap.parse_args()
    model = ensure_model(args.model)
    common = common_overrides(model, args.nsamples, args.seqlen, args.max_tokens, "test") + [f"calibration.seed={args.seed}"]
    key = cell_key(args)
    if args.doc_only:
        write_doc(args, key)
        return
    cells = {(method, setting): common + method_overrides(method) + pattern_overrides(setting)
             for setting in args.settings.split(",") for method in args.methods.split(",")}
    run_grid(args.results, key, "method", cells, model, args.seqlen, args.max_tokens, "test", dense=seed0_dense(args))
    if not args.seed:
        write_doc(args, key)


def model_tag(args: argparse.Namespace) -> str:
    """The model's name in cell keys, section files and the command; none for SmolLM2, whose cells came first."""
    return "" if args.model == "smollm2" else args.model


def tagged(name: str, args: argparse.Namespace) -> str:
    """``name`` followed by the model's tag: a section file's name (``bench``, ``bench-qwen``)."""
    return "-".join(filter(None, [name, model_tag(args)]))


def cell_key(args: argparse.Namespace, seed: int | None = None) -> str:
    """The model and protocol of a cell in bench.jsonl, for ``seed`` (default: ``args.seed``)."""
    seed = args.seed if seed is None else seed
    tag = model_tag(args)
    return (f"{tag}-" if tag else "") + f"n{args.nsamples}-s{args.seqlen}-e{args.max_tokens}" + (f"-seed{seed}" if seed else "")


def seed0_dense(args: argparse.Namespace) -> Callable[[], dict[str, float]] | None:
    """For another seed's key, the seed-0 key's dense perplexities where they are recorded: the dense model does not
    depend on the calibration seed, and evaluating it again takes minutes on Qwen."""
    if not args.seed:
        return None
    base = cell_key(args, seed=0)
    rows = [r for r in load_jsonl(args.results) if r["key"] == base and r["method"] == "dense"]
    return (lambda: rows[0].get("ppls") or {"wikitext2[test]": rows[0]["ppl"]}) if rows else None


TITLES = {"bench": "perplexity by method and sparsity", "owl": "the OWL layer profile against uniform sparsity",
          "realloc": "N:M with channel reallocation against N:M in the stored order",
          "realloc-absorbed": "N:M with channel reallocation only where the checkpoint stays N:M as stored",
          "realloc-lsa": "N:M with the reallocation order refined by linear sum assignment"}


def write_doc(args: argparse.Namespace, key: str) -> None:
    rows = [r for r in load_jsonl(args.results) if r["key"] == key]
    by = {(r["method"], r["setting"]): r for r in rows}
    settings = [s for s in args.settings.split(",") if any(k[1] == s for k in by)]
    methods = [m for m in args.methods.split(",") if any(k[0] == m for k in by)]
    dense = by.get(("dense", "-"))
    label, tag = MODELS[args.model].label, model_tag(args)
    section = tagged(args.section, args)
    flag = f"--model {tag} " if tag else ""
    cmd = (f"python scripts/bench.py {flag}--settings {args.settings} --methods {args.methods} --nsamples {args.nsamples} "
           f"--seqlen {args.seqlen} --max-tokens {args.max_tokens}")
    out = [
        f"## {label}: {TITLES.get(args.section, args.section)}",
        "",
        f"Made by `{cmd}` (cells accumulate in docs/results/data/bench.jsonl across runs) on 2 CPU cores, float32. Calibration: "
        f"{args.nsamples} windows x {args.seqlen} tokens of the C4 sample, seed 0, the same windows for every method, "
        "each method calibrating as it does by default (sequential: each layer on the outputs of the pruned layers before "
        "it; statprune unstructured: on the dense model's activations, one pass per layer; each statprune cell's mode is listed "
        f"below the tables). Perplexity: first {args.max_tokens} tokens of the WikiText-2 **test** split, seqlen {args.seqlen}. "
        "Sparsity is over the pruned linears (every decoder linear; embeddings, norms and the LM head stay dense). "
        "`+owl`: the OWL layer profile (M the method's: 5, statprune and magnitude 7; lambda 0.08; a parenthesis sets them). "
        "`+realloc`: N:M channel reallocation (`pruning.reallocation`; N:M in the permuted channel order, MLP down projections "
        "as stored). `+realloc(absorbed)`: only on the MLP down projections (every weight N:M as stored; statprune's "
        "default at N:M). `+realloc(off)`: none. `+resperm`: one permutation of the residual stream for every linear "
        "that reads it (`pruning.residual_permutation`; every weight N:M as stored; statprune's default at N:M). `+lsa`: "
        "the reallocation orders refined by linear sum assignment (`pruning.lsa`). `+alloc`: a layer's sparsity spread over "
        "its linears by lost energy (`pruning.allocation: energy`; otherwise every linear at the layer's sparsity). "
        "`(off)`: without statprune's default.",
        "",
        "### Perplexity (lower is better)",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    if dense:
        out.append("| dense | " + " | ".join(f"{dense['ppl']:.2f}" for _ in settings) + " |")
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{by[(m, s)]['ppl']:.2f}" if (m, s) in by else "" for s in settings) + " |")
    out += ["", f"![perplexity by method and sparsity]({section}.png)", "",
            "### Prune wall time (s) and peak RSS (MiB) of each `statprune prune` process", "",
            "Cells accumulate across runs: only cells of one commit that ran alone on the machine compare (see "
            "below); `docs/results.md`'s cost section times every method side by side.", "",
            "| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{by[(m, s)]['prune_s']:.1f} s, {by[(m, s)]['peak_rss_mib']:.0f} MiB"
                                            if (m, s) in by else "" for s in settings) + " |")
    if any(("statprune", s) in by and ("wanda", s) in by for s in settings):
        out.append("| statprune / wanda | " + " | ".join(
            f"{by[('statprune', s)]['prune_s'] / by[('wanda', s)]['prune_s']:.2f}x"
            if ("statprune", s) in by and ("wanda", s) in by else "" for s in settings) + " |")
    commits: dict[str, list[str]] = {}
    for m in methods:
        made = sorted({by[(m, s)].get("commit", "an earlier commit") for s in settings if (m, s) in by})
        commits.setdefault(", ".join(made), []).append(m)
    out += ["", "Code of each row: " + "; ".join(f"{', '.join(ms)}: {c}" for c, ms in commits.items()) + "."]
    if args.timing_note:
        out += ["", args.timing_note]
    resolved = {s: by[("statprune", s)] for s in settings if ("statprune", s) in by}
    if resolved:  # its defaults depend on the pattern (compensation, skip_first_tokens and calibration mode: auto)
        out += ["", "statprune options and calibration mode (as resolved for each setting):", ""]
        out += [f"- {s}: `{r['options']}`, {r.get('mode', 'sequential')}" for s, r in resolved.items()]
    write_section(section, "\n".join(out) + "\n")
    plot = {"model": label, "datasets": ["wikitext2[test]"], "dense": [dense["ppl"]] if dense else [float("nan")],
            "methods": methods, "settings": settings,
            "cells": [{"method": m, "setting": s, "perplexity": [r["ppl"]], "error": None} for (m, s), r in by.items() if m != "dense"]}
    write_plot(plot, DRAFTS / f"{section}.png")


if __name__ == "__main__":
    main()
