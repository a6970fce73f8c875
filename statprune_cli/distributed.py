"""Data-parallel calibration with torch.distributed: one process per device, launched by torchrun or accelerate.

Each process runs every ``world_size``-th calibration batch (global batch j on rank j % world) through
each layer, so activations stay local. Statistics are sums; to make the result independent of the
number of processes, every rank gathers every rank's per-batch statistics and sums them in global
batch order, which is exactly the order one process uses (and one process runs the same code). The
float32 Gram matrices of SparseGPT are too large to gather per batch: they are summed locally in
batch order, then all-reduced, so they differ from a one-process run by float32 rounding.

Outside a launcher (no ``WORLD_SIZE`` above 1 in the environment) nothing is initialised and
``Communicator()`` is the single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from statprune_cli.errors import ConfigError, PruneError
from statprune_cli.stats import ChannelStats

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0, and outside a launcher: the process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Communicator:
    """This process's place in the job, and the few collectives the engine needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def suffix(self) -> str:
        """Added to the names of files each process keeps for itself (activations, resume inputs)."""
        return "" if self.world_size == 1 else f"-rank{self.rank}"

    def shard(self, items: list[T]) -> list[T]:
        """This rank's batches: global batch j goes to rank j % world_size."""
        return items[self.rank::self.world_size]

    def gather_ordered(self, local: list[T]) -> list[T]:
        """Every rank's per-batch items, in global batch order (the inverse of ``shard``)."""
        if self.world_size == 1:
            return list(local)
        everyone: list[Any] = [None] * self.world_size
        self._collective("gathering per-batch results", dist.all_gather_object, everyone, local)
        total = sum(len(r) for r in everyone)
        return [everyone[j % self.world_size][j // self.world_size] for j in range(total)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.world_size > 1:
            self._collective("summing the input Hessians", dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            self._collective("waiting for the other processes", dist.barrier)

    def merge_stats(self, local: list[dict[str, ChannelStats]], grams: dict[str, torch.Tensor],
                    sketches: dict[str, torch.Tensor] | None = None) -> dict[str, ChannelStats]:
        """Each linear's statistics over every rank's batches.

        ``local``: this rank's per-batch sums (no Gram matrices), gathered from every rank in one
        collective and added in global batch order. ``grams`` and ``sketches``: this rank's Gram matrices and
        sketches, summed in its batch order, all-reduced in place. Every rank must hold at least one batch (the pipeline
        checks it), or the all-reduces would not match.
        """
        ordered = self.gather_ordered(local)
        merged = {name: ChannelStats.total([batch[name] for batch in ordered]) for name in ordered[0]}
        for field, summed in (("gram", grams), ("sketch", sketches or {})):
            for name, t in summed.items():
                setattr(merged[name], field, self.all_reduce_sum(t))
        return merged

    def _collective(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # gloo and nccl raise RuntimeError subclasses when a peer is gone
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PruneError(f"rank {self.rank} of {self.world_size}: lost the other processes while {what} "
                             f"(one of them failed, was killed or timed out): {first}") from None


def device_for_rank(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """Each process on a CUDA machine takes the GPU of its local rank; CPU processes share the CPU."""
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index is not None:
        raise ConfigError("runtime.device", f"expected cuda or auto under a launcher (each process takes "
                                            f"cuda:LOCAL_RANK), got {device}")
    return torch.device("cuda", local_rank)


@contextmanager
def launched(device: torch.device, timeout_minutes: float = 30.0) -> Iterator[tuple[Communicator, torch.device]]:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU) and yield (communicator, this rank's device).

    ``timeout_minutes``: a rank that hangs (one that dies fails the others at once) stops the others after this.

    Outside a launcher: the single-process communicator and ``device`` unchanged.
    """
    world = launched_world_size()
    if world == 1:
        yield Communicator(), device
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for_rank(device, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Communicator(rank, world), device
    finally:
        dist.destroy_process_group()
