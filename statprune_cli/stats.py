"""Channel-wise statistics of a linear layer's input: sums, so they merge across batches and processes.

Per input channel j we keep count, sum x_j, sum x_j^2 and sum |x_j| in float64. Every method's
activation term is a function of these (Wanda's ||X_j||_2 is sqrt(sumsq)). Methods that need the
full second-moment matrix (SparseGPT's Hessian) also get ``gram`` = sum x x^T in float32, and statprune's
ADMM update a ``sketch`` of it, sum x (x^T Omega) for a fixed probe Omega (sketch.py), in float32:
sums as well, which merge the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from statprune_cli.errors import InputError, PruneError
from statprune_cli.sketch import probe

FIELDS = ("sum", "sumsq", "sumabs")
CHUNK_ELEMENTS = 1 << 20  # a batch's sums are taken over float64 copies of this many values at a time


@dataclass
class ChannelStats:
    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    sumabs: torch.Tensor
    gram: torch.Tensor | None = None
    sketch: torch.Tensor | None = None  # sum x (x^T Omega), Omega = sketch.probe(channels, its columns)

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        z = torch.zeros(channels, dtype=torch.float64)
        return cls(0, z.clone(), z.clone(), z.clone())

    @classmethod
    def of(cls, x: torch.Tensor, gram: bool = False, sketch: int = 0, sketch_every: int = 1) -> ChannelStats:
        """Statistics of one batch of inputs, shape (..., channels); ``gram`` adds sum x x^T (float32), ``sketch``
        sum x (x^T Omega) with that many probes (float32), estimated from every ``sketch_every``-th token and scaled
        up to all of them: its low-rank directions need far fewer tokens than its two products would read."""
        channels = x.shape[-1]
        # A window's positions after the skipped ones (x[:, k:]) are contiguous per window but not as a whole:
        # taking the windows one by one avoids reshape's copy of the batch.
        pieces = [x] if x.dim() < 3 or x.is_contiguous() else list(x.reshape(-1, *x.shape[-2:]))
        pieces = [piece.reshape(-1, channels) for piece in pieces]
        count = sum(piece.shape[0] for piece in pieces)
        g = None
        if gram:
            g = sum(p32.T @ p32 for p32 in (piece.float() for piece in pieces))  # one float32 view or copy per piece
        y = None
        if sketch:
            omega = probe(channels, min(sketch, channels), x.device)  # more probes than channels: the Gram itself
            rows = [piece[::sketch_every].float() for piece in pieces]
            y = sum(p32.T @ (p32 @ omega) for p32 in rows)
            if sketch_every > 1:
                y.mul_(count / sum(r.shape[0] for r in rows))
        z = torch.zeros(channels, dtype=torch.float64, device=x.device)
        total, squares, absolute = z, z.clone(), z.clone()
        # Column sums as products with a vector of ones: BLAS's gemv is 1.3-3x faster than torch's sum over the
        # first dimension on these shapes (one thread: 512 x 1536, 7.6 -> 2.5 ms; 4096 x 4096, 484 -> 225 ms),
        # and |x| and x^2 are made in place in the one float64 copy of each chunk, not as new tensors.
        for piece in pieces:
            for part in piece.split(max(1, CHUNK_ELEMENTS // channels)):  # float64 copies of a chunk, not of the batch
                p = part.to(torch.float64, copy=True)  # a copy even when x is float64: it is changed in place below
                ones = p.new_ones(1, p.shape[0])
                total += (ones @ p)[0]
                absolute += (ones @ p.abs_())[0]
                squares += (ones @ p.mul_(p))[0]
        return cls(count, total, squares, absolute, g, y)

    @classmethod
    def total(cls, parts: list[ChannelStats]) -> ChannelStats:
        """The sum of ``parts`` added in list order (float addition is not associative: the order is the result)."""
        out = cls.empty(parts[0].sum.numel())
        for p in parts:
            out.add(p)
        return out

    def vectors_on_cpu(self) -> ChannelStats:
        """The per-channel sums alone, in CPU memory: what is kept per batch and exchanged (the Gram matrix and the
        sketch are summed apart)."""
        return ChannelStats(self.count, *(getattr(self, f).cpu() for f in FIELDS))

    def add(self, other: ChannelStats) -> None:
        self.count += other.count
        for f in FIELDS:
            getattr(self, f).add_(getattr(other, f).to(getattr(self, f).device))
        for f in ("gram", "sketch"):  # stay on the device they were computed on: they can be large
            mine, theirs = getattr(self, f), getattr(other, f)
            if theirs is not None:
                setattr(self, f, theirs.clone() if mine is None else mine.add_(theirs.to(mine.device)))

    def permuted(self, order: torch.Tensor) -> ChannelStats:
        """The statistics of the same input with its channels reordered: channel p of the result is ``order[p]``.
        Without the sketch: its probe is not reordered with it."""
        vectors = (getattr(self, f)[order.to(getattr(self, f).device)] for f in FIELDS)
        gram = None if self.gram is None else self.gram[order.to(self.gram.device)][:, order.to(self.gram.device)]
        return ChannelStats(self.count, *vectors, gram)

    # the moments every method uses
    def probed(self, k: int) -> torch.Tensor | None:
        """H Omega with Omega = ``sketch.probe(channels, k)`` (k at most the channels): the sketch of ``k`` probes, or
        from the full Gram matrix; None without either."""
        k = min(k, self.sum.numel())
        if self.sketch is not None and self.sketch.shape[1] == k:
            return self.sketch
        if self.gram is not None:
            return self.gram @ probe(self.gram.shape[0], k, self.gram.device)
        return None

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def m2(self) -> torch.Tensor:
        return self.sumsq / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.m2 - self.mean**2).clamp_min(0.0)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / self.count

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over every calibration token: Wanda's activation norm."""
        return self.sumsq.sqrt()

    def wanda_score(self, weight: torch.Tensor) -> torch.Tensor:
        """|W_ij| * ||X_j||_2 as a new float32 tensor on the weight's device (the weight is untouched): Wanda's score,
        which every method's statistics allow, so OWL, the energy allocation and reallocation orders use it too."""
        return weight.float().abs().mul_(self.l2.to(weight.device, torch.float32))  # in place: no second temporary

    def check_finite(self, name: str) -> None:
        for f in (*FIELDS, "gram", "sketch"):
            t = getattr(self, f)
            if t is not None and not all_finite(t):
                raise PruneError(f"non-finite input statistics ({f}) in {name}: the model produced inf/nan activations")


def all_finite(t: torch.Tensor) -> bool:
    """No nan or inf in ``t``. A sum is finite only if every term is (one nan or inf makes it nan or inf), and
    summing reads the tensor once without a boolean copy: ~20x faster than ``isfinite(t).all()`` on a large
    weight. The elementwise check runs only when the sum is not finite (an overflow is not a nan)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def save_stats(stats: dict[str, ChannelStats], path: Path, metadata: dict[str, str]) -> None:
    tensors = {}
    for name, s in stats.items():
        s.check_finite(name)  # a later one-shot prune would only find them then
        for f in FIELDS:
            tensors[f"{name}.{f}"] = getattr(s, f).contiguous()
        tensors[f"{name}.count"] = torch.tensor([s.count], dtype=torch.int64)
        for f in ("gram", "sketch"):
            if getattr(s, f) is not None:
                tensors[f"{name}.{f}"] = getattr(s, f).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_stats(path: Path) -> tuple[dict[str, ChannelStats], int | None]:
    """The statistics of a ``statprune calibrate`` file, and how many first positions of each window they leave out."""
    if not path.is_file():
        raise InputError(f"--stats: file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            skip = (f.metadata() or {}).get("skip_first_tokens")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # safetensors raises several types for a bad file
        raise InputError(f"--stats: {path} is not a statprune statistics file ({e})") from None
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    try:
        return {
            n: ChannelStats(int(tensors[f"{n}.count"][0]), tensors[f"{n}.sum"], tensors[f"{n}.sumsq"], tensors[f"{n}.sumabs"],
                            tensors.get(f"{n}.gram"), tensors.get(f"{n}.sketch"))
            for n in names
        }, None if skip is None else int(skip)
    except KeyError as e:
        raise InputError(f"--stats: {path} lacks tensor {e}; expected count/sum/sumsq/sumabs per linear") from None
