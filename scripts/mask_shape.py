"""The shape of pruned checkpoints' masks, side by side: where the zeros went, and what output energy they cost.

Why: two masks of the same sparsity can differ in how they spread it (over rows, over input channels, over layers),
and a perplexity gap between methods or profiles (RIA per matrix under OWL, README's Results) is only explained
once that spread is measured. For each checkpoint folder (a `statprune prune` output) and each kind of linear
(q_proj, ..., down_proj, over all layers):

- rows > T, cols > T: the share of output rows / input columns with more than T of their weights zero;
- dead cols: the share of input columns with every weight zero (that input channel is lost to the linear);
- lost energy: with `--dense` and `--stats` (the unpruned model and its `statprune calibrate` statistics), the share
  of the linear's Wanda energy sum (|W_ij| ||X_j||)^2 that its zeros remove (allocation.py's lost share, measured on
  the mask), averaged over the layers; and per layer, the same averaged over the layer's linears;
- row lost, p99: the 99th percentile over a linear's rows of each row's own lost share (Wanda's per-row comparison
  bounds it; a comparison over the whole matrix does not), averaged over the layers.

With `--kind`, the columns of one kind of linear layer by layer as well.

Usage: python scripts/mask_shape.py CKPT [CKPT ...] [--threshold 0.9] [--dense models/smollm2-135m-hf --stats FILE]
       [--kind self_attn.k_proj]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from statprune_cli.stats import ChannelStats, load_stats

LINEAR = re.compile(r"^(?P<layers>.+)\.(?P<index>\d+)\.(?P<name>.+)\.weight$")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The decoder layers' 2-D weights of a saved checkpoint (every safetensors shard), by module name."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for key, t in load_file(shard).items():
            if t.dim() == 2 and LINEAR.match(key) and "embed" not in key:
                out[key[: -len(".weight")]] = t.float()
    if not out:
        raise SystemExit(f"{folder}: no decoder-layer weights in *.safetensors")
    return out


def lost_shares(dense: torch.Tensor, zero: torch.Tensor, stats: ChannelStats) -> tuple[float, float]:
    """Share of the dense linear's Wanda energy that the zeros remove, and the 99th percentile over rows of each
    row's own share (a row that loses most of its energy has lost its output's direction, whatever the total)."""
    energy = stats.wanda_score(dense).double().square()
    lost = energy.masked_fill(~zero, 0.0)
    per_row = lost.sum(1) / energy.sum(1).clamp_min(1e-300)
    return float(lost.sum() / energy.sum()), float(per_row.quantile(0.99))


COLUMNS = ("sparsity", "rows > T", "cols > T", "dead cols", "lost energy", "row lost, p99")


def measure(folder: Path, threshold: float, dense: dict[str, torch.Tensor] | None,
            stats: dict[str, ChannelStats] | None) -> tuple[dict[str, dict[int, list[float]]], dict[int, tuple[float, float]]]:
    """Per kind of linear and layer, ``COLUMNS``; per layer, (sparsity, mean lost energy over its linears)."""
    kinds: dict[str, dict[int, list[float]]] = defaultdict(dict)
    lost_by_layer: dict[int, list[float]] = defaultdict(list)
    zeros_by_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for name, w in weights(folder).items():
        m = LINEAR.match(name + ".weight")
        assert m is not None
        zero = w == 0
        lost, worst = (lost_shares(dense[name], zero, stats[name]) if dense is not None and stats is not None
                       else (float("nan"), float("nan")))
        rows, cols = zero.float().mean(1), zero.float().mean(0)
        index = int(m["index"])
        kinds[m["name"]][index] = [float(zero.float().mean()), float((rows > threshold).float().mean()),
                                   float((cols > threshold).float().mean()), float((cols == 1).float().mean()), lost, worst]
        lost_by_layer[index].append(lost)
        zeros_by_layer[index][0] += int(zero.sum())
        zeros_by_layer[index][1] += zero.numel()
    per_layer = {i: (zeros_by_layer[i][0] / zeros_by_layer[i][1], sum(v) / len(v)) for i, v in sorted(lost_by_layer.items())}
    return kinds, per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dense", type=Path, help="the unpruned model's folder, for the lost energy")
    ap.add_argument("--stats", type=Path, help="`statprune calibrate` statistics of --dense")
    ap.add_argument("--kind", help="also a table of this kind of linear (e.g. self_attn.k_proj) layer by layer")
    args = ap.parse_args()
    dense = weights(args.dense) if args.dense else None
    stats = load_stats(args.stats)[0] if args.stats else None
    header = " | ".join(c.replace("T", f"{args.threshold:.0%}") for c in COLUMNS)
    kind_table = [f"| checkpoint | linear | {header} |", "|---|---|" + "---:|" * len(COLUMNS)]
    layer_table = ["| checkpoint | layer | sparsity | lost energy (mean over its linears) |", "|---|---:|---:|---:|"]
    one_kind = [f"| checkpoint | {args.kind}: layer | {header} |", "|---|---:|" + "---:|" * len(COLUMNS)]

    def cells(values: list[float]) -> str:
        return " | ".join("-" if v != v else f"{v:.2%}" for v in values)  # NaN: no --dense and --stats

    for folder in args.checkpoints:
        kinds, layers = measure(folder, args.threshold, dense, stats)
        kind_table += [f"| {folder.name} | {k} | {cells(torch.tensor(list(v.values()), dtype=torch.float64).mean(0).tolist())} |"
                       for k, v in kinds.items()]
        layer_table += [f"| {folder.name} | {i} | {s:.3f} | {cells([lost])} |" for i, (s, lost) in layers.items()]
        one_kind += [f"| {folder.name} | {i} | {cells(v)} |" for i, v in sorted(kinds.get(args.kind, {}).items())]
    print("\n\n".join("\n".join(t) for t in (kind_table, layer_table, one_kind if args.kind else [])).rstrip())


if __name__ == "__main__":
    main()
