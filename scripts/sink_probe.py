"""Which MLP input channels draw their energy from a window's first position?

Where a model makes its attention sink at the first position, a few down-projection inputs of one early layer fire
there alone: the residual stream's norm at position 0 jumps by two orders of magnitude after that layer. Left out
of the statistics (``calibration.skip_first_tokens: 1``), those channels look silent, so an activation-weighted score
prunes the very weights that make the sink. This prints, per layer, how many of the down projection's input channels
take over half their energy from position 0, and the residual norm at position 0 over the mean of the others.

Usage: python scripts/sink_probe.py MODEL_DIR [--windows 8] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import DATA  # noqa: E402


@torch.no_grad()
def first_position_shares(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """Per decoder layer: each down-projection input channel's share of its energy (sum of x^2) at position 0, and
    the residual stream's norm at position 0 over the mean norm of the other positions, after that layer."""
    layers = model.model.layers
    energy: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x2 = inputs[0].double() ** 2
        energy.append((x2[:, 0].sum(0), x2.sum((0, 1))))

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in layers]
    try:
        hidden = model(ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    shares = [first / total.clamp_min(1e-300) for first, total in energy]
    ratios = [float(h[:, 0].norm(dim=-1).mean() / h[:, 1:].norm(dim=-1).mean()) if h.shape[1] > 1 else 1.0
              for h in hidden[1:]]
    return shares, ratios


def c4_windows(tok, windows: int, seqlen: int) -> torch.Tensor:
    """The first ``seqlen`` tokens of the C4 sample's first ``windows`` documents that long (no special tokens)."""
    c4 = DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
    docs = (json.loads(line)["text"] for line in c4.read_text().splitlines())
    ids = (t[:seqlen] for t in (tok(d, add_special_tokens=False)["input_ids"] for d in docs) if len(t) >= seqlen)
    return torch.tensor(list(itertools.islice(ids, windows)))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    shares, ratios = first_position_shares(model, c4_windows(tok, args.windows, args.seqlen))
    for i, (s, r) in enumerate(zip(shares, ratios)):
        print(f"layer {i:2d}: {int((s > 0.5).sum()):3d} channels with over half their energy at position 0 "
              f"(largest share {float(s.max()):.3f}); residual norm at position 0 / others {r:6.1f}")


if __name__ == "__main__":
    main()
