"""What the energy allocation costs per decoder layer of a 4096-wide Llama: `allocation.column_losses` (the
sort of each linear's Wanda scores, the allocation's whole cost) at the default element bound against a fixed
row count, side by side in one process, on random weights (the time does not depend on the values).

The end-to-end figure is `bench_cost.py`; a 4-layer model's few seconds of allocation are inside its
run-to-run noise, so this measures them alone. With `--model` and `--stats` (a `statprune calibrate` file of that
model) it also measures what a row sample costs the allocation's aim: the summed lost energy share over each
layer's linears (exact, from whole rows) of the allocation chosen from curves on fewer rows, against the
whole-row optimum and uniform sparsity. FILE from e.g. `statprune calibrate configs/smollm2-135m-statprune-50.yaml
-o FILE` (the dense model's statistics).

Usage: python scripts/bench_allocation.py [--rows 2048] [--repeats 3]
       [--model models/smollm2-135m-hf --stats FILE --sparsity 0.5 --budgets 65536,131072,262144]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from statprune_cli.allocation import SAMPLED_ELEMENTS, column_losses, energy_sparsities
from statprune_cli.config import PruningConfig
from statprune_cli.layers import find_decoder_layers, target_linears
from statprune_cli.masks import pruned_count
from statprune_cli.stats import ChannelStats, load_stats

LAYER = {"q/k/v/o_proj": ((4096, 4096), 4), "gate/up_proj": ((11008, 4096), 2), "down_proj": ((4096, 11008), 1)}


def seconds(weight: torch.Tensor, stats: ChannelStats, elements: int, repeats: int) -> float:
    """Fastest of ``repeats`` calls on ``elements`` weights' rows."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        column_losses(weight, stats, elements)
        best = min(best, time.perf_counter() - start)
    return best


def sample_accuracy(model_dir: str, stats_file: Path, sparsity: float, budgets: list[int]) -> None:
    """Allocations from curves on rows filling each element budget, scored by the exact lost share."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stats, _ = load_stats(stats_file)
    blocks_name, blocks = find_decoder_layers(model)
    layers = [target_linears(block, f"{blocks_name}.{i}", ["Linear"], []) for i, block in enumerate(blocks)]
    lost = {name: column_losses(lin.weight, stats[name], lin.weight.numel()).cumsum(0)  # whole rows
            for linears in layers for name, lin in linears.items()}
    columns = {name: lin.weight.shape[1] for linears in layers for name, lin in linears.items()}

    def share(sparsities: dict[str, float]) -> float:
        """Summed lost energy share over every layer's linears."""
        return sum(float(lost[n][k - 1]) for n, s in sparsities.items() if (k := pruned_count(columns[n], s)))

    def allocate(budget: int) -> dict[str, float]:
        return {k: v for linears in layers for k, v in
                energy_sparsities(linears, stats, sparsity, PruningConfig.allocation_spread, budget).items()}

    best = share(allocate(max(lin.weight.numel() for linears in layers for lin in linears.values())))
    uniform = share({name: sparsity for name in lost})
    print(f"\n{model_dir} at {sparsity:g}: summed lost share {best:.4f} with whole rows, uniform {uniform / best - 1:+.1%}")
    print("| weights per linear | lost share | against whole rows |\n|---:|---:|---:|")
    for budget in budgets:
        got = share(allocate(budget))
        print(f"| {budget:,} | {got:.4f} | {got / best - 1:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="the fixed row count to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="a model folder, for the sample's accuracy (with --stats)")
    ap.add_argument("--stats", type=Path, help="`statprune calibrate` statistics of --model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--budgets", default="65536,131072,262144", help="weights per linear to sample rows by")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per call, fastest of {args.repeats}")
    print(f"| linear | shape | x per layer | {args.rows} rows | default ({SAMPLED_ELEMENTS:,} weights) |")
    print("|---|---|---:|---:|---:|")
    totals = [0.0, 0.0]
    for name, (shape, count) in LAYER.items():
        weight, stats = torch.randn(shape), ChannelStats.of(torch.randn(64, shape[1]))
        times = [seconds(weight, stats, elements, args.repeats) for elements in (args.rows * shape[1], SAMPLED_ELEMENTS)]
        totals = [t + count * s for t, s in zip(totals, times)]
        print(f"| {name} | {shape[0]} x {shape[1]} | {count} | {times[0]:.3f} | {times[1]:.3f} |")
    print(f"| per decoder layer | | | {totals[0]:.2f} | {totals[1]:.2f} |")
    if args.model and args.stats:
        sample_accuracy(args.model, args.stats, args.sparsity, [int(b) for b in args.budgets.split(",")])


if __name__ == "__main__":
    main()
