"""Why statprune's energy compensation may not transfer to families that normalise each sublayer's output.

Llama, Mistral and Qwen2 add the MLP's output to the residual stream as it is; Gemma 2/3 (pre- and post-norm) and
OLMo 2 (post-norm only) pass it through an RMSNorm first, which divides out any common scale of its rows. Restoring a
row's lost energy (gamma_i > 1 on the kept weights) then acts only through how gamma differs between rows and through
the gate's non-linearity. This probe shows the mechanism on tiny random models of each architecture (no checkpoint
needed): the MLP of one decoder layer, pruned at 50% by statprune's `paper` preset with beta 0, 0.5 and 1 on that
layer's own inputs, against the dense MLP, measured where the residual stream receives it.

Usage: python scripts/post_norm_probe.py [--layer 1] [--windows 16] [--seqlen 64] [--seeds 0,1,2]
Prints a markdown table (also written to out/results/post_norm.md). Random weights show the mechanism, not the
size of the effect on a trained model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

from _runs import DRAFTS  # noqa: E402
from conftest import COMMON, tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, Olmo2Config  # noqa: E402

from statprune_cli.methods import Target, build_method  # noqa: E402
from statprune_cli.stats import ChannelStats  # noqa: E402

ARCHS = {"llama": "pre-norm", "qwen2": "pre-norm", "gemma2": "pre- and post-norm", "gemma3": "pre- and post-norm",
         "olmo2": "post-norm"}
BETAS = (0.0, 0.5, 1.0)


def config(arch: str):
    """The tests' tiny config of ``arch``, with weights drawn 10x wider than the default 0.02: at width 64 the default
    leaves the MLP's outputs so small that the norms' epsilon, not their scale invariance, decides what they do."""
    if arch == "gemma2":
        cfg = Gemma2Config(**COMMON, head_dim=16, sliding_window=8)
    elif arch == "olmo2":
        cfg = Olmo2Config(**COMMON)
    else:
        cfg = tiny_config(arch)
    cfg.initializer_range = 0.2
    return cfg


def mlp_inputs(model: nn.Module, layer: int, windows: int, seqlen: int, seed: int) -> torch.Tensor:
    """The MLP's inputs in decoder layer ``layer`` on random token windows, one row per position."""
    seen: list[torch.Tensor] = []
    mlp = model.model.layers[layer].mlp
    hook = mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    ids = torch.randint(3, model.config.vocab_size, (windows, seqlen), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return torch.cat(seen)


def into_residual(layer: nn.Module) -> nn.Module:
    """What the MLP's output goes through before the residual add: the post-feed-forward norm where there is one."""
    return getattr(layer, "post_feedforward_layernorm", None) or nn.Identity()


def pruned_mlp(mlp: nn.Module, x: torch.Tensor, beta: float) -> nn.Module:
    """``mlp`` with gate, up and down at 50% by statprune's `paper` preset, each on its dense inputs (one pass)."""
    method = build_method("statprune", {"preset": "paper", "beta": beta}, "unstructured")
    out = copy.deepcopy(mlp)
    inputs = {"gate_proj": x, "up_proj": x, "down_proj": mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)}
    for name, xin in inputs.items():
        method.prune(getattr(out, name), ChannelStats.of(xin), Target(0.5, name=f"model.layers.0.mlp.{name}"))
    return out


def measure(arch: str, layer: int, windows: int, seqlen: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch)).eval()
    block = model.model.layers[layer]
    post, x = into_residual(block), mlp_inputs(model, layer, windows, seqlen, seed)
    with torch.no_grad():
        dense = post(block.mlp(x))
        row = {"uniform x1.2": float((post(1.2 * block.mlp(x)) - dense).norm() / dense.norm())}
        for beta in BETAS:
            pruned = post(pruned_mlp(block.mlp, x, beta)(x))
            row[f"beta {beta:g}"] = float((pruned - dense).norm() / dense.norm())
            row[f"norm, beta {beta:g}"] = float(pruned.norm() / dense.norm())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cols = ["uniform x1.2"] + [f"beta {b:g}" for b in BETAS] + [f"norm, beta {b:g}" for b in BETAS]
    lines = ["Relative error of the MLP's contribution to the residual stream, ||u' - u|| / ||u||, mean over seeds "
             f"{args.seeds} (`python scripts/post_norm_probe.py --seeds {args.seeds}`); `uniform x1.2`: every output row "
             "scaled by 1.2, no pruning; `norm`: ||u'|| / ||u||.", "",
             "| arch | sublayer output | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for arch, kind in ARCHS.items():
        rows = [measure(arch, args.layer, args.windows, args.seqlen, s) for s in seeds]
        lines.append(f"| {arch} | {kind} | " + " | ".join(f"{sum(r[c] for r in rows) / len(rows):.4f}" for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    DRAFTS.mkdir(parents=True, exist_ok=True)
    (DRAFTS / "post_norm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
