"""Where a command runs: threads and device, the launcher's process group, where layers and activations live
(CPU memory or the checkpoint), and a timer per phase. Shared by every command.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from statprune_cli.config import Config
from statprune_cli.distributed import Communicator, launched, launched_world_size
from statprune_cli.engine import LayerDone, LayerIO, LayerwiseEngine, Resume
from statprune_cli.errors import ConfigError
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import load_model, load_model_config, torch_dtype
from statprune_cli.memory import return_freed_memory_promptly
from statprune_cli.streaming import Checkpoint, StreamedLayers, load_skeleton, resolve_folder, should_stream
from statprune_cli.ui import UI


def setup_runtime(cfg: Config) -> torch.device:
    """Apply ``runtime.threads`` and resolve ``runtime.device``: the same for every command."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return resolve_device(cfg.runtime.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("runtime.device", f"{name} asked for, but no CUDA device is available")
    return torch.device(name)


class Timer:
    """Wall time per named phase, for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def decide_streaming(cfg: Config) -> bool:
    """Whether this run reads its layers from the checkpoint one at a time. Called before anything is
    tokenized or loaded: from here on a streaming run's large blocks are mmapped, so none of them
    land in heap holes that would stay resident (see ``return_freed_memory_promptly``)."""
    streaming = should_stream(cfg.model, cfg.runtime.streaming, cfg.runtime.streaming_memory_share)
    if streaming:
        return_freed_memory_promptly()
    return streaming


def check_world(cfg: Config, batches: list[torch.Tensor] | None) -> None:
    """Under a launcher, every process needs a calibration batch of its own."""
    world = launched_world_size()
    if batches is not None and len(batches) < world:
        raise ConfigError("calibration.nsamples", f"expected at least one batch per process: {cfg.calibration.nsamples} "
                                                  f"windows in batches of {cfg.calibration.batch_size} give {len(batches)} "
                                                  f"batches for {world} processes")


@dataclass
class Placement:
    """Where the engine finds layers (CPU memory or the checkpoint) and keeps activations, and its resume hooks."""

    io: LayerIO | None = None
    activation_dir: Path | None = None
    resume: Resume | None = None
    on_layer_done: LayerDone | None = None
    comm: Communicator = field(default_factory=Communicator)

    def engine(self, model: torch.nn.Module, device: torch.device, cfg: Config, ui: UI) -> LayerwiseEngine:
        return LayerwiseEngine(model, device, cfg.runtime.offload_activations, ui, io=self.io,
                               activation_dir=self.activation_dir, comm=self.comm)


@contextmanager
def reading_engine(cfg: Config, device: torch.device, streaming: bool, near: Path | None,
                   ui: UI) -> Iterator[LayerwiseEngine]:
    """An engine over the unpruned model, streamed from its checkpoint when ``streaming`` (``decide_streaming``)
    (calibrate and eval-ppl write no weights, so they need no output folder), in the launcher's process group."""
    with launched(device, cfg.runtime.dist_timeout_minutes) as (comm, device), \
            tempfile.TemporaryDirectory(prefix=".statprune-activations-", dir=near.parent if near else None) as acts:
        placement = Placement(activation_dir=Path(acts), comm=comm)
        if streaming:
            checkpoint = Checkpoint(resolve_folder(cfg.model))
            ui.log(f"streaming {cfg.model.name_or_path}: one decoder layer in memory at a time")
            model = load_skeleton(cfg.model, load_model_config(cfg.model), checkpoint)
            placement.io = StreamedLayers(checkpoint, find_decoder_layers(model)[0], torch_dtype(cfg.model.dtype))
        else:
            model = load_model(cfg.model)
        yield placement.engine(model, device, cfg, ui)


@contextmanager
def activation_folder(cfg: Config, out: Path) -> Iterator[Path | None]:
    """A temporary folder beside the output for ``offload_activations: disk`` (None otherwise)."""
    if cfg.runtime.offload_activations != "disk":
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.activations-", dir=out.parent) as folder:
        yield Path(folder)

