"""Zero-shot accuracy on SmolLM2-135M: dense, then each method at one sparsity, through lm-evaluation-harness (0-shot).

The task data are the local files in ../shared/data/zeroshot (no hub access). Calibration as in scripts/bench.py:
64 windows x 512 tokens of the C4 sample, seed 0, each method at its defaults
(`--methods` takes bench.py's names: `statprune+paper` is the paper preset). Each pruned model is scored inside its own
`statprune prune` process, on the in-memory pruned model (`eval.zeroshot`); the dense model by
`statprune eval-zeroshot`. Results accumulate in docs/results/data/zeroshot.jsonl (a rerun with the same protocol skips
what is there); the table goes to out/results/zeroshot.md, and docs/results.md takes its figures by hand.

Usage: python scripts/bench_zeroshot.py [--methods wanda,statprune] [--sparsity 0.5] [--limit 40]
                                        [--tasks boolq,rte,...] [--nsamples 64] [--seqlen 512] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (DATA, RESULTS, ROOT, append_jsonl, common_overrides, ensure_model, load_jsonl,  # noqa: E402
                   method_overrides, prune, statprune, write_section)

ZEROSHOT_DATA = DATA / "zeroshot"
TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa"
WANDA_SEVEN = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="wanda,statprune")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--results", type=Path, default=RESULTS / "zeroshot.jsonl")
    args = ap.parse_args()
    model = ensure_model()
    key = f"n{args.nsamples}-s{args.seqlen}-l{args.limit}-{args.tasks}"
    done = {r["method"] for r in load_jsonl(args.results) if r["key"] == key}
    if "dense" not in done:
        z = statprune("eval-zeroshot", str(model), "--data-dir", str(ZEROSHOT_DATA), "--tasks", args.tasks,
                      "--limit", str(args.limit), "--batch-size", str(args.batch_size))
        record(args.results, key, "dense", z)
    zeroshot = [f"eval.zeroshot.tasks=[{args.tasks}]", f"eval.zeroshot.data_dir={ZEROSHOT_DATA}",
                f"eval.zeroshot.limit={args.limit}", f"eval.zeroshot.batch_size={args.batch_size}"]
    for method in args.methods.split(","):
        if method in done:
            continue
        overrides = (common_overrides(model, args.nsamples, args.seqlen, args.seqlen, "test")
                     + ["eval.datasets=[]", *method_overrides(method), f"pruning.sparsity={args.sparsity}",
                        "pruning.pattern=unstructured", *zeroshot])
        r = prune(overrides, ROOT / "bench-out" / "zeroshot-tmp")
        record(args.results, key, method, r["zeroshot"], prune_s=r["timings"]["prune"], zeroshot_s=r["timings"]["zeroshot"])
    write_doc(args, key)


def record(results: Path, key: str, method: str, z: dict, **extra: float) -> None:
    append_jsonl(results, {"key": key, "method": method, "zeroshot": z, **extra})
    print(f"{method:<10} mean acc {100 * z['mean_acc']:.2f}  " + "  ".join(f"{t['task']} {100 * t['acc']:.1f}" for t in z["tasks"]),
          flush=True)


def write_doc(args: argparse.Namespace, key: str) -> None:
    by = {r["method"]: r["zeroshot"] for r in load_jsonl(args.results) if r["key"] == key}
    methods = [m for m in ["dense", *args.methods.split(",")] if m in by]
    tasks = args.tasks.split(",")
    any_z = by[methods[0]]
    seven = [t for t in WANDA_SEVEN if t in tasks]

    def acc(method: str, task: str) -> float:
        return next(100 * t["acc"] for t in by[method]["tasks"] if t["task"] == task)

    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    se = 100 * (0.25 / args.limit) ** 0.5  # the binomial standard error at 50% accuracy
    norms = sum(t["acc_norm"] is not None for t in any_z["tasks"])
    caveats = {t["task"]: t["caveat"] for t in any_z["tasks"] if t["caveat"]}
    header = [f"{t}{' *' if t in caveats else ''}" for t in tasks]
    cmd = (f"python scripts/bench_zeroshot.py --methods {args.methods} --sparsity {args.sparsity} --limit {args.limit} "
           f"--tasks {args.tasks} --nsamples {args.nsamples} --seqlen {args.seqlen} --batch-size {args.batch_size}")
    out = [
        f"## Zero-shot accuracy (lm-evaluation-harness {any_z['lm_eval_version']}, 0-shot, %)",
        "",
        f"Made by `{threads}python {cmd[7:]}` on 2 CPU cores, float32. **Only the first {args.limit} examples of each task** (`--limit "
        f"{args.limit}`), so one task's accuracy has a standard error of up to {se:.1f} points and the mean over "
        f"{len(tasks)} tasks about {se / len(tasks) ** 0.5:.1f}: differences of a point or two between methods are noise. "
        "Data: the local files "
        "in `../shared/data/zeroshot` (no hub access), read through lm-eval's stock task configs (prompts, choices, "
        f"metrics). Model: the demo's SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized), so its numbers do not compare with published ones for the base model. Pruned models: {args.sparsity:.0%} unstructured, calibrated as above ({args.nsamples} windows x "
        f"{args.seqlen} tokens of the C4 sample), scored inside `statprune prune` on the in-memory pruned model.",
        "",
        "| model | " + " | ".join(header) + f" | mean ({len(tasks)}) |" + (f" mean ({len(seven)}, Wanda's set) |" if seven != tasks else "")
        + f" mean acc_norm ({norms}) |",
        "|---|" + "---:|" * (len(tasks) + 2 + (seven != tasks)),
    ]
    for m in methods:
        label = m if m == "dense" else f"{m} {args.sparsity:.0%}"
        mean7 = f" {sum(acc(m, t) for t in seven) / len(seven):.2f} |" if seven != tasks else ""
        out.append(f"| {label} | " + " | ".join(f"{acc(m, t):.1f}" for t in tasks) + f" | {100 * by[m]['mean_acc']:.2f} |" + mean7
                   + f" {100 * by[m]['mean_acc_norm']:.2f} |")
    out += ["", "Per task and in the means: lm-eval's `acc` (the metric the Wanda and SparseGPT tables use). The last "
                f"column is the mean `acc_norm` over the {norms} tasks that report it; per-task `acc_norm` is in each "
                "run's report.json."]
    out += [f"\n\\* {task}: {why}; write this caveat beside any number computed on it." for task, why in caveats.items()]
    write_section("zeroshot", "\n".join(out) + "\n")


if __name__ == "__main__":
    main()
