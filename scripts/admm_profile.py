"""Where the N:M update's time goes, on one linear of a given shape (default: a 7B model's 11008 x 4096 MLP weight):
one ADMM step's parts (the Woodbury solve's two products with the sketch's in x k basis, the growing mask, the
elementwise work), timed apart, and the whole 20-step update with the solve's products in float32 (the product's)
and in bfloat16, with the output error each leaves, ||(W - W') X||^2 / ||W X||^2, on synthetic inputs.

bfloat16 products were the candidate lever for the N:M prune time (docs/experiments.md); this says what they save
of the whole update, not of the products alone. Times are the best of ``--repeats``: compare ratios, not seconds.

Usage: python scripts/admm_profile.py [--shape 11008x4096] [--rank 512] [--pattern 2:4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from statprune_cli.admm import RAMP, RHO, STEPS, SketchSystem, admm, gradual_mask  # noqa: E402
from statprune_cli.sketch import nystrom, probe  # noqa: E402


class Bf16System(SketchSystem):
    """The sketched system whose Woodbury solve takes its two products with the weights in bfloat16; the diagonal
    part and everything elementwise stay float32."""

    def solve_(self, r: torch.Tensor) -> torch.Tensor:
        rp = r.bfloat16() @ self.p.bfloat16()
        return r.mul_(self.inv_a).sub_(rp @ self.q_t.bfloat16())


def best(f: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls after one untimed (warm-up) call."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="11008x4096", help="rows x input channels of the weight")
    ap.add_argument("--rank", type=int, default=512, help="probes of the sketch (the full preset's N:M default)")
    ap.add_argument("--pattern", default="2:4", help="N:M, or a sparsity such as 0.5 for the unstructured mask")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    nm = tuple(int(v) for v in args.pattern.split(":")) if ":" in args.pattern else None
    sparsity = nm[0] / nm[1] if nm else float(args.pattern)

    g = torch.Generator().manual_seed(0)
    # Inputs with a few massive channels and uneven scales, as LLM activations have: H is far from its diagonal.
    x = torch.randn(args.tokens, cols, generator=g) * torch.rand(cols, generator=g).add_(0.1)
    x[:, :4] *= 20
    h = x.T @ x
    omega = probe(cols, args.rank, x.device)
    u, lam = nystrom(h @ omega, omega)
    w = torch.randn(rows, cols, generator=g) * 0.02
    dense = float(((w @ h) * w).sum())

    def error(pruned: torch.Tensor) -> float:
        d = w - pruned
        return float(((d @ h) * d).sum()) / dense

    print(f"{rows} x {cols}, {args.rank} probes, {args.pattern}; seconds (best of {args.repeats})")
    fp32 = SketchSystem.of(h.diagonal().clone(), u, lam)
    bf16 = Bf16System.of(h.diagonal().clone(), u, lam)
    r, z, dual = w.clone(), w.clone(), torch.zeros_like(w)
    mask = w > 0
    mid_ramp = sparsity * 0.5  # a ramp step's sparsity: every ramp step takes about the same work

    # one step of admm.admm besides the solve and the mask (whose timing takes the absolute values)
    def elementwise() -> None:
        torch.add(w, dual, out=z).masked_fill_(mask, 0.0)
        dual.add_(w).sub_(z)
        torch.sub(z, dual, out=r).mul_(RHO).add_(w)

    parts = {
        "solve, float32 products": best(lambda: fp32.solve_(r), args.repeats),
        "solve, bfloat16 products": best(lambda: bf16.solve_(r), args.repeats),
        "growing mask (ramp steps)": best(lambda: gradual_mask(w.abs(), mid_ramp, nm), args.repeats),
        "elementwise": best(elementwise, args.repeats),
    }
    for name, seconds in parts.items():
        print(f"  step part: {name:28s} {seconds:7.3f}")
    for name, system in (("float32", fp32), ("bfloat16", bf16)):
        out: list[torch.Tensor] = []
        seconds = best(lambda s=system, o=out: o.append(admm(w, s, sparsity, nm)), 1)
        print(f"  update ({STEPS} steps, mask over {RAMP}), {name} products: {seconds:7.2f} s, "
              f"output error {error(out[-1]):.6f}")


if __name__ == "__main__":
    main()
