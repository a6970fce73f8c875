"""How much of SparseGPT's lead can a method without the full input Hessian win back? Measured per linear.

statprune sees per-channel statistics: the diagonal of H = X^T X and the channel means. SparseGPT uses all
of H. This script takes SmolLM2-135M's dense inputs to the linears of three layers (the calibration windows
of the benchmark: C4 sample, seed 0) and measures each linear's output error tr(dW H dW^T) after:

- ``wanda``: Wanda's mask, weights kept as they are (the reference: 1.000),
- ``row scale``: the same mask, each row rescaled by its least-squares factor; no compensation from channel
  statistics that rescales rows (statprune's energy restoration) can do better,
- ``scale+bias``: the same with a per-row intercept too (``compensation: measured``'s best case),
- ``block OBS`` (N:M only): exact Optimal Brain Surgeon inside every group of M channels, i.e. the best mask
  and update of each group given the group's own M x M block of H (an extension of the channel statistics to
  block statistics, at a cost close to Wanda's),
- ``LS, full H``: Wanda's mask, each row's kept weights moved by their exact least-squares update
  H_KK^-1 H_KP w_P (1% damping): the best any update of that mask can do,
- ``sketch k=64 (per row)`` / ``sketch k=256 (shared)``: the same update under statprune's sketched H
  (sketch.py; each row's own k x k system, or one shared by all rows: scripts/experimental.py's ``statprune-ls``),
- ``ADMM, sketch k=256`` / ``ADMM, full H``: ADMM with a gradual mask (admm.py; mask and update together) on the
  sketched H (the full preset's N:M update) or on the whole H, as published,
- ``sparsegpt``: statprune's SparseGPT (percdamp 0.01, blocksize 128),
- ``sparsegpt, H in blocks of B``: the same on the block-diagonal part of H (blocks of B consecutive channels,
  B = 32 and 128): block statistics cost tokens x in x B to collect, not in^2, and no error crosses a block.

Each cell is the mean over the linears of that kind of the error relative to Wanda's. Lower is better.
Writes out/results/recon-gap.md. Usage: python scripts/recon_gap.py [--nsamples 64] [--layers 2,15,28]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import DATA, ensure_model, write_section  # noqa: E402
from experimental import SKETCH_DAMP, least_squares_update  # noqa: E402

from statprune_cli.admm import DAMP, RHO, SketchSystem, admm  # noqa: E402
from statprune_cli.config import DataConfig  # noqa: E402
from statprune_cli.data import calibration_windows, load_documents  # noqa: E402
from statprune_cli.masks import nm_mask, unstructured_mask  # noqa: E402
from statprune_cli.methods.base import Target  # noqa: E402
from statprune_cli.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune  # noqa: E402
from statprune_cli.sketch import nystrom, probe  # noqa: E402

SETTINGS = {"50%": None, "2:4": (2, 4), "4:8": (4, 8)}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_COLUMNS = {f"sparsegpt, H in blocks of {size}": size for size in (32, 128)}  # column -> block size of H


def error(w: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row: ||(w - w2) X||^2 = (w - w2) H (w - w2)^T."""
    d = (w - w2).double()
    return torch.einsum("ij,jk,ik->i", d, h, d)


def row_scale_error(w: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, mu: torch.Tensor | None, n: int) -> float:
    """Total error once every row of ``w2`` gets its least-squares scale (and intercept when ``mu`` is given)."""
    w, w2 = w.double(), w2.double()
    if mu is not None:  # centred second moments: the intercept takes the means
        h = h - n * torch.outer(mu, mu)
    yy = torch.einsum("ij,jk,ik->i", w, h, w)
    yp = torch.einsum("ij,jk,ik->i", w, h, w2)
    pp = torch.einsum("ij,jk,ik->i", w2, h, w2).clamp_min(1e-30)
    return float((yy - yp**2 / pp).sum())


def block_obs(w: torch.Tensor, h: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row and group of m channels: the n weights to drop and the update of the others that minimise the
    row's error given the group's block of H (OBS restricted to the block), chosen among all C(m, n) masks."""
    rows, cols = w.shape
    g = cols // m
    wd = w.double().reshape(rows, g, m)
    hb = torch.stack([h[i:i + m, i:i + m] for i in range(0, cols, m)])  # (g, m, m)
    hb = hb + 1e-8 * hb.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(m, dtype=h.dtype)
    best = torch.full((rows, g), float("inf"), dtype=torch.float64)
    out = torch.zeros_like(wd)
    for pruned in itertools.combinations(range(m), n):
        p = list(pruned)
        k = [i for i in range(m) if i not in pruned]
        t = torch.linalg.solve(hb[:, k][:, :, k], hb[:, k][:, :, p])  # (g, m-n, n): kept update per pruned weight
        s = hb[:, p][:, :, p] - hb[:, p][:, :, k] @ t  # Schur complement: the error left per pruned weight pair
        wp = wd[:, :, p]
        e = torch.einsum("rgi,gij,rgj->rg", wp, s, wp)
        cand = torch.zeros_like(wd)
        cand[:, :, k] = wd[:, :, k] + torch.einsum("gkp,rgp->rgk", t, wp)
        take = e < best
        best = torch.where(take, e, best)
        out = torch.where(take[..., None], cand, out)
    return out.reshape(rows, cols).float()


def exact_update(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each row's kept weights moved by H_KK^-1 H_KP w_P (H damped as the sketch's D is), pruned ones zero."""
    hd = h + SKETCH_DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    out = w.double().clone()
    for r in range(w.shape[0]):
        k, p = (~mask[r]).nonzero()[:, 0], mask[r].nonzero()[:, 0]
        out[r, k] += torch.linalg.solve(hd[k][:, k], hd[k][:, p] @ out[r, p])
        out[r, p] = 0.0
    return out


def sketched_update(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """statprune's sketched least-squares update of ``w`` under ``mask`` (the sketch made from the exact H)."""
    k = min(k, h.shape[0])
    u, lam = nystrom(h @ probe(h.shape[0], k).double(), probe(h.shape[0], k))
    out = w.double().clone()
    least_squares_update(out, mask, h.diagonal(), u, lam, SKETCH_DAMP, per_row)
    return out


@dataclass(frozen=True)
class FullSystem:
    """The whole H, unit-diagonal and damped, in the interface ``admm`` takes (``admm.SketchSystem``'s)."""

    norm: torch.Tensor
    hn: torch.Tensor
    inv: torch.Tensor

    @classmethod
    def of(cls, h: torch.Tensor, damp: float = DAMP, rho: float = RHO) -> FullSystem:
        norm = h.diagonal().sqrt().clamp_min(1e-8)
        eye = torch.eye(h.shape[0], dtype=h.dtype)
        hn = h / norm[:, None] / norm[None, :] + damp * eye
        return cls(norm.float(), hn.float(), torch.linalg.inv(hn + rho * eye).float())

    def hmul(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.hn

    def solve_(self, r: torch.Tensor) -> torch.Tensor:
        return r.copy_(r @ self.inv)


def admm_full(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """``admm`` on the whole H, as published (Boza, 2024)."""
    return admm(w, FullSystem.of(h), sparsity, nm)


def admm_sketch(w: torch.Tensor, h: torch.Tensor, k: int, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """``admm`` on statprune's sketch of H (the full preset's N:M update)."""
    k = min(k, h.shape[0])
    u, lam = nystrom(h @ probe(h.shape[0], k).double(), probe(h.shape[0], k))
    return admm(w, SketchSystem.of(h.diagonal(), u, lam), sparsity, nm)


def block_diagonal(h: torch.Tensor, size: int) -> torch.Tensor:
    """``h`` with every entry outside the diagonal blocks of ``size`` consecutive channels set to zero."""
    block = torch.arange(h.shape[0], device=h.device) // size
    return h.masked_fill(block[:, None] != block[None, :], 0.0)


def sparsegpt_weights(w: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor], target: Target,
                      blocksize: int) -> torch.Tensor:
    """statprune's SparseGPT of ``w`` with ``factor`` = ``inverse_hessian_factor`` of its Gram matrix (dead channels
    zeroed, as the method does)."""
    hinv, dead = factor
    out = w.clone()
    out[:, dead] = 0.0
    return sparsegpt_prune(out, hinv, target, blocksize)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", default="2,15,28")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: the tests import this module's helpers

    torch.manual_seed(0)
    path = ensure_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    docs = load_documents(DataConfig(dataset=f"jsonl:{DATA / 'c4' / 'c4-train.00000-of-01024.first1000.jsonl'}"),
                          "calibration", "train")
    windows, _ = calibration_windows(docs, lambda b: tok(b)["input_ids"], args.nsamples, args.seqlen, 0)
    layers = [int(i) for i in args.layers.split(",")]
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            h, s = sums.get(name, (0, 0))
            sums[name] = (h + x.T @ x, s + x.sum(0))
        return record

    linears = {f"{i}.{n}": mod for i in layers for n, mod in model.model.layers[i].named_modules()
               if n.split(".")[-1] in KINDS}
    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
    with torch.no_grad():
        for b in windows.split(8):
            model(b)
    for handle in handles:
        handle.remove()
    ntok = windows.numel()

    cells: dict[tuple[str, str, str], list[float]] = {}
    for name, mod in linears.items():
        h, s = sums[name]
        w = mod.weight.data.float()
        score = w.abs() * h.diagonal().sqrt().float()
        # each Hessian's factor once, for every setting; the sweep's blocks match H's, so no error leaves them
        factors = {"sparsegpt": (inverse_hessian_factor(h.float(), ntok, 0.01), 128)}
        factors.update({col: (inverse_hessian_factor(block_diagonal(h, size).float(), ntok, 0.01), size)
                        for col, size in BLOCK_COLUMNS.items()})
        for setting, nm in SETTINGS.items():
            mask = nm_mask(score, *nm) if nm else unstructured_mask(score, 0.5)
            wanda = w.masked_fill(mask, 0.0)
            base = float(error(w, wanda, h).sum())
            target = Target(0.5, nm, "matrix" if nm is None else "row")
            found = {"row scale": row_scale_error(w, wanda, h, None, ntok),
                     "scale+bias": row_scale_error(w, wanda, h, s / ntok, ntok),
                     "LS, full H": float(error(w, exact_update(w, mask, h), h).sum()),
                     "sketch k=64 (per row)": float(error(w, sketched_update(w, mask, h, 64, True), h).sum()),
                     "sketch k=256 (shared)": float(error(w, sketched_update(w, mask, h, 256, False), h).sum()),
                     "ADMM, sketch k=256": float(error(w, admm_sketch(w, h, 256, 0.5, nm), h).sum()),
                     "ADMM, full H": float(error(w, admm_full(w, h, 0.5, nm), h).sum())}
            for col, (factor, blocksize) in factors.items():
                found[col] = float(error(w, sparsegpt_weights(w, factor, target, blocksize), h).sum())
            if nm:
                found["block OBS"] = float(error(w, block_obs(w, h, *nm), h).sum())
            kind = name.split(".")[-1]
            for col, e in found.items():
                cells.setdefault((kind, setting, col), []).append(e / base)
        print(f"done {name}", flush=True)

    cols = ("row scale", "scale+bias", "block OBS", *BLOCK_COLUMNS, "sketch k=64 (per row)", "sketch k=256 (shared)",
            "ADMM, sketch k=256", "LS, full H", "ADMM, full H", "sparsegpt")
    lines = ["## How much of SparseGPT's lead is within reach of channel statistics\n",
             f"Made by: `python scripts/recon_gap.py --nsamples {args.nsamples} --seqlen {args.seqlen} --layers {args.layers}` "
             f"(SmolLM2-135M, dense inputs of layers {args.layers}, C4 sample, seed 0). Each cell: a linear's output "
             "error tr(dW H dW^T) relative to Wanda's mask with the weights as they are (1.000), averaged over the "
             "linears of that kind. `row scale` / `scale+bias`: Wanda's mask with each row's least-squares scale "
             "(and intercept), the best any row-wise compensation from channel statistics can do; `block OBS`: exact "
             "OBS inside each N:M group from the group's own block of H; `sparsegpt, H in blocks of B`: SparseGPT on "
             "the block-diagonal part of H (blocks of B consecutive channels, statistics that cost tokens x in x B); "
             "`sketch k=..`: Wanda's mask with the sketched least-squares update (`statprune-ls`, "
             "each row's own system or one shared by all rows); `ADMM, ..`: mask and update together (the "
             "full preset's N:M update on the sketch, or on the whole H); `LS, full H`: the exact "
             "least-squares update of Wanda's mask; `sparsegpt`: the full Hessian.\n"]
    for setting in SETTINGS:
        shown = [c for c in cols if (KINDS[0], setting, c) in cells]
        lines += [f"\n**{setting}**\n", "| linear | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
        for kind in KINDS:
            lines.append(f"| {kind} | " + " | ".join(f"{sum(v) / len(v):.3f}" for c in shown
                                                     for v in [cells[(kind, setting, c)]]) + " |")
    lines.append("")
    write_section("recon-gap", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
