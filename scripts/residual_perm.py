"""Experiment: one permutation of the residual stream, chosen so the N:M groups of every linear that reads it are
spread by importance, stored in the checkpoint (a Llama with the same function), then statprune's N:M default on it.

statprune's default reallocates only what the model absorbs (the MLP down projections). q/k/v and gate/up read the
residual stream, whose channel order every layer shares: one permutation of it (embeddings, norms, the readers'
columns, o/down rows, the head) changes no function, and if chosen for all readers at once it spreads their N:M
groups too. This script measures how much that would gain before any engine code is written for it:

1. dense channel statistics (`statprune calibrate`, 64 windows, seed 0);
2. every reader's Wanda score |W| sqrt(E[x^2]), each linear scaled to mean 1 and stacked, gives one
   reallocation order (masks.reallocation_order), refined by LSA (masks.refine_order);
3. the permuted checkpoint; its dense perplexity must equal the original's;
4. `statprune prune` with the ablation's protocol (validation split) on it, the default N:M variant.

Usage: python scripts/residual_perm.py --pattern 2:4 [--seed 0]   (Llama-architecture checkpoints only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402
from _runs import ROOT, common_overrides, dense_ppl, ensure_model, pattern_overrides, prune, statprune  # noqa: E402

from statprune_cli.masks import reallocation_order, refine_order  # noqa: E402
from statprune_cli.stats import load_stats  # noqa: E402

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
VARIANT = "wanda+energy(m2/b=0.5;mlp)+realloc(absorbed)+lsa"  # statprune's N:M default, as the ablation names it


def residual_order(model: torch.nn.Module, stats_file: Path, n: int, m: int) -> torch.Tensor:
    stats, _ = load_stats(stats_file)
    scores = []
    for i, layer in enumerate(model.model.layers):
        for r in READERS:
            s = stats[f"model.layers.{i}.{r}"]
            score = layer.get_submodule(r).weight.detach().abs() * s.m2.sqrt().float()
            scores.append(score / score.mean())  # every reader weighs the same
    stacked = torch.cat(scores)
    return refine_order(stacked, reallocation_order(stacked, m), n, m)


@torch.no_grad()
def permute_residual(model: torch.nn.Module, order: torch.Tensor) -> None:
    model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:, order])
    model.model.norm.weight.copy_(model.model.norm.weight[order])
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.copy_(norm.weight[order])
        for r in READERS:
            w = layer.get_submodule(r).weight
            w.copy_(w[:, order])
        for r in WRITERS:
            w = layer.get_submodule(r).weight
            w.copy_(w[order])
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.copy_(model.lm_head.weight[:, order])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n, m = map(int, args.pattern.split(":"))
    source = ensure_model()
    work = ROOT / "bench-out" / "residual-perm"
    work.mkdir(parents=True, exist_ok=True)
    stats_file = work / f"dense-seed{args.seed}.stats.safetensors"
    base = ["--set", f"model.name_or_path={source}", "--set", "model.gguf_file=null", "--set", f"calibration.seed={args.seed}",
            "--set", "calibration.skip_first_tokens=0"]
    if not stats_file.exists():
        statprune("calibrate", str(ROOT / "configs" / "smollm2-135m-statprune-50.yaml"), *base, "-o", str(stats_file))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    order = residual_order(model, stats_file, n, m)
    permute_residual(model, order)
    permuted = work / f"smollm2-{n}of{m}-seed{args.seed}"
    model.save_pretrained(permuted)
    AutoTokenizer.from_pretrained(source).save_pretrained(permuted)
    print(f"dense perplexity (validation): {dense_ppl(source, 512, 16384, 'validation'):.6f} original, "
          f"{dense_ppl(permuted, 512, 16384, 'validation'):.6f} permuted", flush=True)
    common = common_overrides(permuted, 64, 512, 16384, "validation") + [
        f"calibration.seed={args.seed}", "calibration.skip_first_tokens=0", "pruning.sequential=true"]
    cell = common + ablate.VARIANTS[VARIANT] + ablate.pin_energy_targets(ablate.VARIANTS[VARIANT]) + pattern_overrides(args.pattern)
    r = prune(cell, work / "tmp")
    print(f"{args.pattern} {VARIANT} on the permuted checkpoint, seed {args.seed}: "
          f"{r['perplexity'][0]['perplexity']:.3f} (prune {r['timings']['prune']:.0f} s)")


if __name__ == "__main__":
    main()
