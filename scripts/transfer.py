"""Do statprune's defaults transfer? Each part of the `full` preset left out in turn, on both real models, scored on
two validation texts over several calibration seeds.

Calibration: N windows of the C4 sample's first 800 documents. Scores: perplexity on the first 16,384 tokens of
the WikiText-2 *validation* split and of the sample's last 200 documents, which no calibration window comes from.
A part stays in the default only where leaving it out loses on both models and both texts (mean over the seeds);
a part whose gain rests on one model or one text is reported as such. Cells accumulate in
docs/results/data/transfer.jsonl (a rerun skips what is there); the table goes to out/results/transfer.md.

Usage: python scripts/transfer.py [--models smollm2,qwen] [--seeds 0,1,2] [--setting 50%] [--variants a,b] [--doc-only]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (DATA, MODELS, RESULTS, ROOT, common_overrides, dense_ppl, ensure_model, load_jsonl,  # noqa: E402
                   pattern_overrides, run_grid, statprune, write_section)

C4 = DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
HELD_OUT = 200  # the sample's last documents: scored, never drawn for calibration
SPLIT = ROOT / "bench-out" / "c4-split"

# Unstructured: each part of the former `full` preset (energy compensation, first window position left out of the
# statistics, energy allocation; one pass) left out in turn, the drop-one ablation that chose today's default
# (`full` = `paper` there, the last variant but the references). The overrides are explicit, so a later seed
# measures the same configurations whatever the defaults are. N:M: today's `full` with one part off.
FORMER_FULL = ["calibration.skip_first_tokens=1", "pruning.allocation=energy"]
FULL = ["calibration.skip_first_tokens=0", "pruning.allocation=uniform"]
VARIANTS: dict[str, dict[str, list[str]]] = {
    "unstructured": {
        "former full": FORMER_FULL,
        "former full -energy": [*FORMER_FULL, "pruning.options.beta=0.0"],
        "former full -allocation": [*FORMER_FULL, "pruning.allocation=uniform"],
        "former full -skip1": [*FORMER_FULL, "calibration.skip_first_tokens=0"],
        "former full +sequential": [*FORMER_FULL, "pruning.sequential=true"],
        "former full -allocation -skip1 (= full)": FULL,
        "wanda": ["pruning.method=wanda"],
        "sparsegpt": ["pruning.method=sparsegpt"],
        "full +sketch": [*FULL, "pruning.options.sketch_rank=256"],  # ADMM on a 256-probe sketch, as at N:M
        # the same fitted to the pruned model's inputs, as at N:M (two passes per layer)
        "full +sketch +sequential": [*FULL, "pruning.options.sketch_rank=256", "pruning.sequential=true"],
        "full +owl": [*FULL, "pruning.profile=owl"],  # OWL's layer profile (outlier count above 7x the mean score)
    },
    "nm": {
        "full": [],
        "full -energy": ["pruning.options.beta=0.0"],
        "full -sketch": ["pruning.options.sketch_rank=0"],
        "full -resperm": ["pruning.residual_permutation=false"],
        "full -realloc": ["pruning.reallocation=false", "pruning.residual_permutation=false"],
        "paper": ["pruning.options.preset=paper"],
        "paper (alpha 0.5)": ["pruning.options.preset=paper", "pruning.options.alpha=0.5"],  # RIA's activation exponent
        "wanda": ["pruning.method=wanda"],
        "sparsegpt": ["pruning.method=sparsegpt"],
        "ria": ["pruning.method=ria"],
        "full (LS update)": ["pruning.method=statprune-ls"],  # the former update (scripts/experimental.py)
        "full (ADMM 10 steps)": ["pruning.method=statprune-admm10"],  # half the update's cost
        "full (ADMM 20 steps)": ["pruning.method=statprune"],  # = full today, for a comparison at one commit
        "full +sketch512": ["pruning.options.sketch_rank=512"],
    },
}


def c4_split() -> tuple[Path, Path]:
    """The C4 sample cut in two files once: calibration documents, then the held-out ones."""
    calib, held = SPLIT / "calibration.jsonl", SPLIT / "held-out.jsonl"
    if not held.exists():
        lines = [line for line in C4.read_text().splitlines() if line.strip()]
        SPLIT.mkdir(parents=True, exist_ok=True)
        calib.write_text("\n".join(lines[:-HELD_OUT]) + "\n")
        tmp = held.with_suffix(".tmp")
        tmp.write_text("\n".join(lines[-HELD_OUT:]) + "\n")
        tmp.rename(held)  # written last: its presence says both files are whole
    return calib, held


@functools.cache  # one model's dense perplexities are the same for every seed
def dense_ppls(model: Path, held: Path, seqlen: int, tokens: int) -> dict[str, float]:
    c4 = statprune("eval-ppl", str(model), "--dataset", "c4", "--data-files", str(held), "--seqlen", str(seqlen),
                   "--max-tokens", str(tokens))[0]
    return {"wikitext2[validation]": dense_ppl(model, seqlen, tokens, "validation"), c4["dataset"]: c4["perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--setting", default="50%")
    ap.add_argument("--variants", default=None, help="default: every variant of the setting's kind")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--results", type=Path, default=RESULTS / "transfer.jsonl")
    ap.add_argument("--doc-only", action="store_true", help="rewrite out/results/transfer.md from the cells, run nothing")
    args = ap.parse_args()
    kind = "unstructured" if args.setting.endswith("%") else "nm"
    names = args.variants.split(",") if args.variants else list(VARIANTS[kind])
    calib, held = c4_split()
    for name in args.models.split(",") if not args.doc_only else []:
        model = ensure_model(name)
        for seed in args.seeds.split(","):
            common = common_overrides(model, args.nsamples, args.seqlen, args.eval_tokens, "validation") + [
                f"calibration.data_files={calib}", f"calibration.seed={seed}",
                f"eval.datasets=[{{dataset: wikitext2, data_files: '{DATA / 'wikitext-2-raw'}', split: validation}}, "
                f"{{dataset: c4, data_files: '{held}'}}]"]
            cells = {(v, args.setting): common + VARIANTS[kind][v] + pattern_overrides(args.setting) for v in names}
            run_grid(args.results, cell_key(name, args, seed), "variant", cells, model, args.seqlen, args.eval_tokens,
                     "validation", dense=functools.partial(dense_ppls, model, held, args.seqlen, args.eval_tokens))
    write_section("transfer", table(args, kind))


def cell_key(model: str, args: argparse.Namespace, seed: int | str) -> str:
    return f"{model}-n{args.nsamples}-s{args.seqlen}-e{args.eval_tokens}-seed{seed}"


def table(args: argparse.Namespace, kind: str) -> str:
    """Per model and text: each variant's perplexity change against the kind's first variant on the same seed,
    averaged over seeds."""
    rows = load_jsonl(args.results)
    seeds = args.seeds.split(",")
    ref = next(iter(VARIANTS[kind]))
    lines = [f"# Do the defaults transfer? ({args.setting}, {args.nsamples} windows, seeds {args.seeds})", "",
             f"Made by: `python scripts/transfer.py --models {args.models} --seeds {args.seeds} --setting {args.setting}"
             f" --nsamples {args.nsamples}`. Change against `{ref}` on the same seed, mean over the seeds (per seed in "
             "brackets); lower is better. Texts: WikiText-2 validation, held-out C4 documents.", ""]
    for model in args.models.split(","):
        got = {(r["variant"], seed, text): p for seed in seeds for r in rows
               if r["key"] == cell_key(model, args, seed) and r["setting"] in (args.setting, "-") for text, p in r["ppls"].items()}
        texts = list(dict.fromkeys(k[2] for k in got))  # in the order the cells list them: WikiText-2 first
        lines += [f"## {MODELS[model].label}", "", "| variant | " + " | ".join(f"{t} (mean ppl)" for t in texts)
                  + " | " + " | ".join(f"{t} vs {ref}" for t in texts) + " |", "|---|" + "---:|" * (2 * len(texts))]
        for v in ["dense", *VARIANTS[kind]]:
            means, changes = [], []
            for t in texts:
                have = [s for s in seeds if (v, s, t) in got]
                means.append(f"{sum(got[v, s, t] for s in have) / len(have):.2f}" if have else "")
                paired = [got[v, s, t] / got[ref, s, t] - 1 for s in have if (ref, s, t) in got]
                changes.append(f"{sum(paired) / len(paired):+.1%} [" + ", ".join(f"{d:+.1%}" for d in paired) + "]"
                               if paired and v not in (ref, "dense") else "")
            if any(means):
                lines.append(f"| {v} | " + " | ".join(means) + " | " + " | ".join(changes) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
