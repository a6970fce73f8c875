"""Does SparseGPT's damping, or a window's first position, dominate a linear's H = Σ x xᵀ?

SparseGPT adds λ = percdamp · mean_j H_jj to the diagonal of H = Σ x xᵀ before inverting it. Where a few input
channels carry most of the energy (the massive activations of an attention sink), the mean is theirs, and λ exceeds
the curvature H_jj of most other channels: for those, [H⁻¹]_jj ≈ 1/λ, so the mask score w² / [H⁻¹]_jj² ranks them by
|w| alone (magnitude pruning) and their update is damped away. This prints, per decoder layer, the share of each
linear's input channels with H_jj < λ, on the dense model's activations, and the share of trace(H) that comes from
each window's first position (an attention sink's tokens would make the layer-wise fit theirs).

Usage: python scripts/damping_probe.py MODEL_DIR [--windows 8] [--seqlen 512] [--percdamp 0.01]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sink_probe import c4_windows  # noqa: E402


@torch.no_grad()
def damped_shares(model: nn.Module, ids: torch.Tensor, percdamp: float = 0.01) -> dict[str, tuple[float, float]]:
    """Per linear of the decoder layers (``layers.I.NAME``): the share of input channels whose H_jj is below λ, and
    the share of trace(H) at position 0."""
    diag: dict[str, torch.Tensor] = {}
    first: dict[str, float] = {}

    def hook_for(name: str):
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x2 = inputs[0].double() ** 2
            diag[name] = diag.get(name, 0) + x2.flatten(0, -2).sum(0)
            first[name] = first.get(name, 0.0) + float(x2[:, 0].sum())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(f"layers.{n}")) for n, m in model.model.layers.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return {name: (float((d < percdamp * d.mean()).double().mean()), first[name] / float(d.sum()))
            for name, d in diag.items()}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--percdamp", type=float, default=0.01)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    shares = damped_shares(model, c4_windows(tok, args.windows, args.seqlen), args.percdamp)
    layers: dict[str, list[str]] = {}
    for name, (damped, first) in shares.items():
        layer, kind = name.split(".")[1], name.rsplit(".", 1)[-1]
        layers.setdefault(layer, []).append(f"{kind} {damped:.1%} / {first:.1%}")
    print("per linear: input channels below the damping / share of trace(H) at position 0")
    for layer, cells in layers.items():
        print(f"layer {int(layer):2d}: " + ", ".join(cells))
    print(f"mean over linears: {sum(d for d, _ in shares.values()) / len(shares):.2%} of input channels below the damping; "
          f"largest share of a trace at position 0: {max(f for _, f in shares.values()):.1%}")


if __name__ == "__main__":
    main()
