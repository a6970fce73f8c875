"""Where statprune stands against its quality targets on each benchmark model: test perplexity averaged over the
calibration seeds, from the cells `scripts/bench.py` recorded (nothing is run).

Targets: the default (`full`) below Wanda in every setting, at or below SparseGPT in every setting and at least 5%
below it at N:M; the `paper` preset below Wanda and RIA in every setting. A change is the mean over the seeds both
methods ran of statprune's perplexity over the other's, minus one. Unstructured, `paper` is the default's method
(the same weights), so a missing `paper` cell there is the default's. Writes out/results/targets.md.

Usage: python scripts/targets.py [--models smollm2,qwen] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import MODELS, RESULTS, load_jsonl, write_section  # noqa: E402
from bench import cell_key  # noqa: E402

PROTOCOL = {"nsamples": 64, "seqlen": 512, "max_tokens": 65536}  # bench.py's defaults: the tables' protocol
SETTINGS = ["50%", "60%", "2:4", "4:8"]
# (statprune row, reference method, the change it must reach: below 0, at or below 0, 5% below)
CHECKS = [("statprune", "wanda", "<0"), ("statprune", "sparsegpt", "sgpt"),
          ("statprune+paper", "wanda", "<0"), ("statprune+paper", "ria", "<0")]


def cells(rows: list[dict], model: str, seeds: set[int]) -> dict[tuple[str, str], dict[int, float]]:
    """(method, setting) -> {seed: perplexity}, current methods only (former defaults are kept as NAME@COMMIT)."""
    keys = {cell_key(argparse.Namespace(model=model, seed=seed, **PROTOCOL)): seed for seed in seeds}
    got: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["key"] in keys and "@" not in r["method"]:
            got.setdefault((r["method"], r["setting"]), {})[keys[r["key"]]] = r["ppl"]
    for setting in SETTINGS:
        if setting.endswith("%"):
            for seed, ppl in got.get(("statprune", setting), {}).items():
                got.setdefault(("statprune+paper", setting), {}).setdefault(seed, ppl)
    return got


def change(got: dict, mine: str, other: str, setting: str) -> tuple[float, list[int]] | None:
    a, b = got.get((mine, setting), {}), got.get((other, setting), {})
    both = sorted(set(a) & set(b))
    return (sum(a[s] / b[s] - 1 for s in both) / len(both), both) if both else None


def met(rule: str, d: float, setting: str) -> bool:
    return d <= (-0.05 if ":" in setting else 0.0) if rule == "sgpt" else d < 0


def table(rows: list[dict], model: str, seeds: set[int]) -> list[str]:
    got = cells(rows, model, seeds)
    lines = [f"## {MODELS[model].label}", "", "| setting | " + " | ".join(f"{m} vs {o}" for m, o, _ in CHECKS) + " |",
             "|---|" + "---|" * len(CHECKS)]
    for setting in SETTINGS:
        out = []
        for mine, other, rule in CHECKS:
            c = change(got, mine, other, setting)
            out.append("" if c is None else
                       f"{c[0]:+.1%} (seeds {','.join(map(str, c[1]))}) {'met' if met(rule, c[0], setting) else '**not met**'}")
        lines.append(f"| {setting} | " + " | ".join(out) + " |")
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--results", type=Path, default=RESULTS / "bench.jsonl")
    args = ap.parse_args()
    rows, seeds = load_jsonl(args.results), {int(s) for s in args.seeds.split(",")}
    lines = ["# statprune against its targets", "", f"Made by: `python scripts/targets.py --models {args.models} "
             f"--seeds {args.seeds}`. Mean change of test perplexity over the seeds both methods ran; lower is better.", ""]
    for model in args.models.split(","):
        lines += table(rows, model, seeds)
    text = "\n".join(lines)
    write_section("targets", text)
    print(text)


if __name__ == "__main__":
    main()
