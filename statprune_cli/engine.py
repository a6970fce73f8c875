"""The layer-wise ("sequential") engine: one decoder layer on the device at a time.

1. Capture the inputs of every decoder layer's first call: the hidden states entering layer 0
   and, per layer, every other argument the model passes (masks, rotary embeddings, ...), which
   differ between layers (Gemma 3 alternates sliding-window and global attention).
2. For each layer: move it to the device, run the batches through it with hooks that collect
   input statistics of the target linears, let the method prune them, run the batches again to
   produce the pruned layer's outputs for the next layer, move it back. The statistics pass needs
   no outputs, so each batch stops at the last target linear's input (``EarlyStop``). With
   ``true_sequential`` the linears of a layer are pruned group by group in the order the layer
   calls them (q/k/v, then o, then gate/up, then down), each group calibrated on the outputs of the
   groups already pruned: one pass per group instead of one per layer.

The engine knows nothing of any method: a ``Job`` brings a ``Pruner`` to call for each linear and a
``TargetRule`` that says each linear's target, both made before the engine runs. Nor does it
know where the layers' weights live: ``InMemoryLayers`` moves them between CPU and the device,
``streaming.StreamedLayers`` reads them from the checkpoint. Activations wait between layers on
the device, in CPU memory, or in memory-mapped files (``offload_activations: disk``).

Under torchrun the engine sees only this process's share of the calibration batches, and its
``Communicator`` merges each layer's per-batch statistics over every process before any mask is
chosen, so every process prunes identically (see ``distributed.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from statprune_cli.distributed import Communicator
from statprune_cli.errors import PruneError
from statprune_cli.layers import find_decoder_layers, target_linears
from statprune_cli.masks import count_zeros
from statprune_cli.permute import ResidualPlan, absorb
from statprune_cli.sketch import resolve_every
from statprune_cli.stats import ChannelStats, all_finite
from statprune_cli.ui import UI

LayerArgs = dict[int, tuple[tuple, dict[str, Any]]]  # batch size -> (extra args, kwargs)


class _StopForward(Exception):
    pass


@contextmanager
def _patched_forwards(layers: nn.ModuleList, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Replace each decoder layer's forward for the duration of a model call."""
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def place_model(model: nn.Module, layers_name: str, device: torch.device) -> None:
    """Move everything but the decoder layers (embeddings, final norm, head, rotary) to ``device``."""
    parent_name, _, attr = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def capture_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device,
    keep: Callable[[int, torch.Tensor], torch.Tensor], advance: Callable[[], None] = lambda: None,
) -> tuple[list[torch.Tensor], list[LayerArgs]]:
    """Hidden states entering layer 0 (one tensor per batch) and every layer's other arguments."""
    hidden: list[torch.Tensor] = []
    layer_args: list[LayerArgs] = [{} for _ in layers]
    last = len(layers) - 1

    def make(i: int) -> Callable[..., Any]:
        def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            layer_args[i].setdefault(hidden_states.shape[0], (args, kwargs))
            if i == 0:
                hidden.append(keep(len(hidden), hidden_states))
            if i == last:
                raise _StopForward
            return hidden_states

        return record

    with _patched_forwards(layers, make):
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            advance()
    return hidden, layer_args


class Activations:
    """Where hidden states wait between layers: the device, CPU memory, or memory-mapped files.

    On disk, each forward pass writes its outputs to a fresh set of files (two sets alternate, so a
    pass never overwrites the inputs it reads), and only the pages in use stay in memory. In CPU memory
    beside a CUDA device, they wait in pinned memory and move on a copy stream of their own: a batch's
    output goes down and the next batch comes up while the current one computes.
    """

    def __init__(self, device: torch.device, offload: bool | str, folder: Path | None = None, suffix: str = "") -> None:
        self.disk = offload == "disk"
        self.device = torch.device("cpu") if offload else device
        self.folder = folder
        self.suffix = suffix  # processes sharing a folder keep apart files
        self.turn = 0
        if self.disk and folder is None:
            raise ValueError("disk offload needs a folder")
        in_cpu_memory = offload is True or offload == "cpu"
        self.copies = torch.cuda.Stream(device) if in_cpu_memory and device.type == "cuda" else None

    def next_pass(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """A ``keep(j, tensor)`` for the j-th batch of one pass."""
        self.turn ^= 1
        if self.copies is not None:
            return self._keep_pinned
        if not self.disk:
            return lambda j, t: t.to(self.device)
        folder = self.folder / f"activations{self.suffix}-{self.turn}"
        folder.mkdir(parents=True, exist_ok=True)

        def keep(j: int, t: torch.Tensor) -> torch.Tensor:
            path = folder / f"{j}.bin"
            path.unlink(missing_ok=True)
            mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
            mapped.copy_(t)
            return mapped

        return keep

    def _keep_pinned(self, j: int, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.copies.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
        with torch.cuda.stream(self.copies):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.copies)  # its memory is not reused before the copy is done
        return host

    def on_device(self, hidden: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
        """The batches of one pass on ``device``; from pinned memory, batch j + 1 is uploaded while batch j computes."""
        if self.copies is None:
            yield from (x.to(device) for x in hidden)
            return

        def upload(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
            with torch.cuda.stream(self.copies):
                x = x.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copies)
            return x, done

        compute = torch.cuda.current_stream(device)
        ahead = upload(hidden[0]) if hidden else None
        for j in range(len(hidden)):
            (x, done), ahead = ahead, (upload(hidden[j + 1]) if j + 1 < len(hidden) else None)
            compute.wait_event(done)  # this batch's upload only, not the copies queued after it
            x.record_stream(compute)  # allocated on the copy stream, used and freed on the compute one
            yield x

    def settle(self) -> None:
        """Every copy to the host of this pass is complete, so the CPU (or another stream) may read the outputs."""
        if self.copies is not None:
            self.copies.synchronize()


class LayerIO(Protocol):
    """Brings a decoder layer's weights to the device for its turn and takes them away after."""

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...

    def fetch_outside(self, model: nn.Module, device: torch.device) -> None:
        """The weights outside the decoder layers, on ``device``, for a forward from the embeddings."""

    def release_outside(self, model: nn.Module) -> None:
        """Those weights may go while only the layers run."""

    def permute_residual(self, model: nn.Module, plan: ResidualPlan, order: torch.Tensor) -> None:
        """Every layer and the weights outside them from now on hold the residual stream in ``order``."""


class InMemoryLayers:
    """Every layer's weights live in CPU memory; only the current one goes to the device."""

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        layer.to(device)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("cpu")

    def fetch_outside(self, model: nn.Module, device: torch.device) -> None:
        pass  # on the device since the engine started

    def release_outside(self, model: nn.Module) -> None:
        pass  # the model stays whole

    def permute_residual(self, model: nn.Module, plan: ResidualPlan, order: torch.Tensor) -> None:
        plan.permute_outside(model, order)
        for layer in find_decoder_layers(model)[1]:
            plan.permute_layer(layer, order)


@torch.no_grad()
def forward_layer(
    layer: nn.Module, inputs: Iterable[torch.Tensor], args: LayerArgs,
    keep: Callable[[int, torch.Tensor], torch.Tensor], advance: Callable[[], None] = lambda: None,
) -> list[torch.Tensor]:
    """``inputs``: the batches, already on the layer's device. A hook that raises ``_StopForward`` ends its
    batch's forward there (a pass run for its hooks alone); that batch has no output."""
    outputs = []
    for j, x in enumerate(inputs):
        extra, kwargs = args[x.shape[0]]
        try:
            y = layer(x, *extra, **kwargs)
            outputs.append(keep(j, y[0] if isinstance(y, tuple) else y))
        except _StopForward:
            pass
        advance()
    return outputs


class EarlyStop:
    """Ends each batch's forward once every observed linear has seen its input, in passes whose outputs nobody reads.

    A sequential run's statistics pass needs the inputs of the target linears, not the layer's output: in a Llama
    layer the down projection (a fifth of the layer's FLOPs) runs for nothing, and in a ``true_sequential`` pass
    for q/k/v everything after them does. Stopping is safe only where the layer calls each of its linears exactly
    once per forward; that is learned per layer class from the first batch, which runs whole while the calls are
    counted, so a mixture of experts that leaves an expert out, or a layer that calls a linear twice, never stops.
    """

    def __init__(self) -> None:
        self.calls_once: dict[type, bool] = {}

    @contextmanager
    def watch(self, layer: nn.Module, observed: Iterable[nn.Module]) -> Iterator[Callable[[nn.Module], None]]:
        """For one pass through ``layer``: yields ``seen(linear)``, to call from each observer after it has run."""
        kind, observed = type(layer), set(observed)
        linears = observed | {m for m in layer.modules() if isinstance(m, nn.Linear)}
        counts: dict[nn.Module, int] = {}
        seen: set[nn.Module] = set()

        def learn() -> None:
            if kind not in self.calls_once and counts:
                self.calls_once[kind] = all(counts.get(m) == 1 for m in linears)

        def batch_start(module: nn.Module, inp: Any) -> None:
            learn()
            seen.clear()

        def count(module: nn.Module, inp: Any) -> None:
            counts[module] = counts.get(module, 0) + 1

        def mark(linear: nn.Module) -> None:
            seen.add(linear)
            if self.calls_once.get(kind) and len(seen) == len(observed):
                raise _StopForward

        handles = [layer.register_forward_pre_hook(batch_start)]
        if kind not in self.calls_once:
            handles += [m.register_forward_pre_hook(count) for m in linears]
        try:
            yield mark
        finally:
            for h in handles:
                h.remove()
            learn()


@torch.no_grad()
def input_groups(layer: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor, args: LayerArgs,
                 device: torch.device) -> list[list[str]]:
    """The target linears in the order ``layer`` calls them on one batch, grouped by the tensor they read.

    Linears that read the same tensor (q/k/v, gate/up) form one group: found from the forward
    itself, so no architecture needs a table of its own.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []  # the tensors are held so no id is reused mid-pass
    names = {lin: name for name, lin in linears.items()}

    def record(module: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        for tensor, group in seen:
            if tensor is inp[0]:
                if names[module] not in group:
                    group.append(names[module])
                return
        seen.append((inp[0], [names[module]]))

    handles = [lin.register_forward_pre_hook(record) for lin in linears.values()]
    try:
        forward_layer(layer, [x.to(device)], args, lambda j, t: t)
    finally:
        for h in handles:
            h.remove()
    groups = [g for _, g in seen]
    called = {n for g in groups for n in g}
    return groups + [[n] for n in linears if n not in called]  # never called on this batch: last, one by one


@torch.no_grad()
def head_logits(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, final_hidden: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from the last decoder layer's output, through the model's own final norm and head (and softcapping).

    ``positions``: only these positions' logits (transformers' ``logits_to_keep``), so a caller can bound the
    positions x vocabulary temporaries.
    """
    last = len(layers) - 1

    def make(i: int) -> Callable[..., Any]:
        return lambda hidden_states, *a, **k: final_hidden if i == last else hidden_states

    with _patched_forwards(layers, make):
        keep = {} if positions is None else {"logits_to_keep": positions.to(final_hidden.device)}
        return model(input_ids=ids.to(final_hidden.device), use_cache=False, **keep).logits


@dataclass
class LinearResult:
    shape: tuple[int, int]
    target: float
    zeros: int
    sparsity: float
    info: dict[str, Any] = field(default_factory=dict)
    reordered: bool = False  # its N:M groups were taken over reallocated input channels
    permutation: torch.Tensor | None = None  # that order, where the model did not absorb it: saved beside the weights
    zeros_before: int | None = None  # zeros the checkpoint already held (dequantized weights do): they count as pruned

    def record(self) -> dict[str, Any]:
        """The JSON-able part (``permutation`` goes to its own file)."""
        return {"shape": list(self.shape), "target": self.target, "zeros": self.zeros, "sparsity": self.sparsity,
                "info": self.info, "reordered": self.reordered, "zeros_before": self.zeros_before}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> LinearResult:
        return cls(tuple(r["shape"]), r["target"], r["zeros"], r["sparsity"], r["info"], r.get("reordered", False),
                   zeros_before=r.get("zeros_before"))


@dataclass
class LayerResult:
    index: int
    seconds: float
    linears: dict[str, LinearResult] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"index": self.index, "seconds": self.seconds, "linears": {n: r.record() for n, r in self.linears.items()}}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> LayerResult:
        """A layer done by an interrupted run, as ``record`` wrote it (its extras are in their own file)."""
        return cls(r["index"], r["seconds"], {n: LinearResult.from_record(v) for n, v in r["linears"].items()})

    def extras(self) -> dict[str, torch.Tensor]:
        """The tensors saved beside the weights: each stored channel order, named ``<linear>.channel_permutation``."""
        return {f"{n}.channel_permutation": r.permutation for n, r in self.linears.items() if r.permutation is not None}


@dataclass
class EngineResult:
    layers: list[LayerResult]
    stats: dict[str, ChannelStats]


@dataclass
class Resume:
    """Where an interrupted run stopped: the next layer, its input activations, and the layers done."""

    next_layer: int
    hidden: list[torch.Tensor]
    results: list[LayerResult]


LayerDone = Callable[[int, nn.Module, list[torch.Tensor], list[LayerResult]], None]


class Pruner(Protocol):
    """What the engine asks of a pruning method (``methods.Method``): whether it needs statistics, and to prune."""

    needs_calibration: bool

    def prune(self, linear: nn.Linear, stats: ChannelStats | None, target: Any) -> Any: ...


class TargetRule(Protocol):
    """Each linear's target (``methods.Target``) of a group pruned together, once their statistics are in: it may
    look at all of them (energy allocation) and at the layer's index (OWL's profile)."""

    def __call__(self, index: int, linears: dict[str, nn.Linear], stats: dict[str, ChannelStats]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Selection:
    """Which linears of each decoder layer are pruned (``pruning.targets`` / ``pruning.ignore``)."""

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class Collect:
    """What a statistics pass gathers: the positions left out, the Gram matrix, a sketch of it and its stride."""

    skip_first: int = 0
    gram: bool = False
    sketch: int = 0
    sketch_every: int | None = None  # None: ``sketch.auto_every`` of the batches' tokens


@dataclass
class Job:
    """A prune for the engine: who prunes, how each linear's target is set, and how the layers are calibrated.

    ``stats`` given: no forward pass at all, masks come from them ("one-shot"). ``sequential``: each layer is
    calibrated on the pruned layers' outputs (a second pass per layer), else on the dense model's.
    ``true_sequential``: inside a layer, each group of linears is calibrated after the groups it reads from are
    pruned (see ``input_groups``).
    """

    pruner: Pruner
    targets: TargetRule
    selection: Selection = Selection()
    collect: Collect = Collect()
    sequential: bool = True
    true_sequential: bool = False
    stats: dict[str, ChannelStats] | None = None


@dataclass
class Pass:
    """One layer's calibration inputs: the hidden states entering it, its other arguments, and what to collect."""

    hidden: list[torch.Tensor]
    args: LayerArgs
    collect: Collect


def settled(collect: Collect, batches: list[torch.Tensor] | None) -> Collect:
    """``collect`` with its sketch stride resolved on every batch's tokens (all processes', so all agree)."""
    if not batches:
        raise ValueError("calibration batches are needed to collect statistics")
    return replace(collect, sketch_every=resolve_every(collect.sketch_every, batches))


class LayerwiseEngine:
    """Runs calibration batches through the decoder stack, one layer on the device at a time."""

    def __init__(self, model: nn.Module, device: torch.device, offload_activations: bool | str, ui: UI,
                 io: LayerIO | None = None, activation_dir: Path | None = None, comm: Communicator | None = None) -> None:
        self.model = model
        self.layers_name, self.layers = find_decoder_layers(model)
        self.device = device
        self.comm = comm or Communicator()
        self.acts = Activations(device, offload_activations, activation_dir, self.comm.suffix)
        self.io = io or InMemoryLayers()
        self.ui = ui
        self.early_stop = EarlyStop()
        place_model(model, self.layers_name, device)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` with its weights on the device, for the duration of the block."""
        layer = self.layers[index]
        self.io.fetch(index, layer, self.device)
        try:
            yield layer
        finally:
            self.io.release(index, layer)

    def linears(self, index: int, selection: Selection) -> dict[str, nn.Linear]:
        return target_linears(self.layers[index], f"{self.layers_name}.{index}", list(selection.targets),
                              list(selection.ignore))

    def capture(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[LayerArgs]]:
        self.io.fetch_outside(self.model, self.device)
        with self.ui.progress("capturing layer inputs", len(batches)) as advance:
            captured = capture_inputs(self.model, self.layers, batches, self.device, self.acts.next_pass(), advance)
        self.acts.settle()
        return captured

    def _forward(self, layer: nn.Module, hidden: list[torch.Tensor], args: LayerArgs, what: str,
                 keep_outputs: bool = True) -> list[torch.Tensor]:
        """``hidden`` through ``layer``; ``keep_outputs`` False: a pass run for its hooks alone stores nothing."""
        keep = self.acts.next_pass() if keep_outputs else (lambda j, t: None)
        with self.ui.progress(what, len(hidden)) as advance:
            outputs = forward_layer(layer, self.acts.on_device(hidden, self.device), args, keep, advance)
        self.acts.settle()
        return outputs

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last decoder layer's outputs for ``batches``, all of them (the caller shards them if it wants)."""
        hidden, args = self.capture(batches)
        with self.ui.progress("layers", len(self.layers)) as advance:
            for i in range(len(self.layers)):
                with self.layer(i) as layer:
                    hidden = self._forward(layer, hidden, args[i], "windows")
                advance()
        return hidden

    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return head_logits(self.model, self.layers, ids, final_hidden.to(self.device), positions)

    def statistics(self, batches: list[torch.Tensor], selection: Selection, collect: Collect) -> dict[str, ChannelStats]:
        """Every target linear's input statistics on the dense model: one pass per layer, nothing pruned."""
        collect = settled(collect, batches)
        hidden, args = self.capture(self.comm.shard(batches))
        self.io.release_outside(self.model)  # from here on only the layers run
        stats: dict[str, ChannelStats] = {}
        with self.ui.progress("calibrating layers", len(self.layers)) as advance:
            for i in range(len(self.layers)):
                with self.layer(i) as layer:
                    found, hidden = self._collect(layer, self.linears(i, selection), Pass(hidden, args[i], collect))
                stats.update(found)
                advance()
        return stats

    def run(self, job: Job, batches: list[torch.Tensor] | None, resume: Resume | None = None,
            on_layer_done: LayerDone | None = None) -> EngineResult:
        """Prune every target linear of ``job``, layer by layer.

        ``batches`` are all of them: this process runs its share (``comm.shard``). ``resume`` starts at a later layer
        with this process's saved activations; ``on_layer_done(i, layer, next inputs, results)`` runs after each
        layer, while its weights are still on the device (streaming writes them out there).
        """
        collect, hidden, args = None, [], []
        if job.stats is None and job.pruner.needs_calibration:
            collect = settled(job.collect, batches)
            hidden, args = self.capture(self.comm.shard(batches))
        all_stats: dict[str, ChannelStats] = dict(job.stats or {})
        results: list[LayerResult] = []
        start = 0
        if resume is not None:
            start, hidden, results = resume.next_layer, resume.hidden, list(resume.results)
            self.ui.log(f"resuming at layer {start} of {len(self.layers)}")
        self.io.release_outside(self.model)  # from here on only the layers run
        with self.ui.progress("pruning layers", len(self.layers) - start) as advance:
            for i in range(start, len(self.layers)):
                t0 = time.perf_counter()
                with self.layer(i) as layer:
                    result = LayerResult(i, 0.0)
                    results.append(result)
                    inputs = None if collect is None else Pass(hidden, args[i], collect)
                    hidden = self._layer_pass(job, layer, result, inputs, all_stats)
                    result.seconds = time.perf_counter() - t0
                    if on_layer_done is not None:
                        on_layer_done(i, layer, hidden, results)
                advance()
        return EngineResult(results, all_stats)

    def _layer_pass(self, job: Job, layer: nn.Module, result: LayerResult, inputs: Pass | None,
                    all_stats: dict[str, ChannelStats]) -> list[torch.Tensor]:
        """Collect layer ``result.index``'s statistics (``inputs``; None: the job needs none), prune its linears,
        and return the inputs of the next layer."""
        linears = self.linears(result.index, job.selection)
        groups = [list(linears)]
        if inputs is not None and job.true_sequential and linears:
            groups = input_groups(layer, linears, inputs.hidden[0], inputs.args, self.device)
        outputs = None
        for group in groups:
            layer_stats: dict[str, ChannelStats] = {}
            if inputs is not None:  # the first pass prunes nothing yet: its outputs are the dense layer's
                keep = outputs is None and not job.sequential
                layer_stats, group_outputs = self._collect(layer, {n: linears[n] for n in group}, inputs, keep)
                outputs = group_outputs if outputs is None else outputs
                all_stats.update(layer_stats)
            planned = job.targets(result.index, {n: linears[n] for n in group}, all_stats)
            for name in group:
                result.linears[name] = self._prune_one(job.pruner, name, linears[name], all_stats.get(name), planned[name])
            for s in layer_stats.values():  # a Gram matrix is in_features^2: keep only the current group's
                s.gram = s.sketch = None
        result.linears = {n: result.linears[n] for n in linears}  # the layer's order, whatever the groups' order
        if inputs is not None and job.sequential:
            outputs = self._forward(layer, inputs.hidden, inputs.args, "calibration batches")
        self._absorb_permutations(result)
        return outputs or []

    def _absorb_permutations(self, result: LayerResult) -> None:
        """A reallocated linear whose input order the model can take (``permute.absorb``) is stored in that order."""
        for name, r in result.linears.items():
            rows = None if r.permutation is None else absorb(self.model, name, r.permutation)
            if rows is not None:
                r.permutation = None
                r.info["channel_permutation"] = f"absorbed: columns stored in reallocation order, {', '.join(rows)} rows to match"

    def _forward_observed(self, layer: nn.Module, observers: dict[nn.Linear, Callable[[torch.Tensor], None]],
                          inputs: Pass, keep_outputs: bool) -> list[torch.Tensor]:
        """One pass through ``layer`` with each observer called on its linear's input.

        Observers never see the first ``collect.skip_first`` positions of a window (attention sinks), and
        linears that read the same tensor (q/k/v, gate/up) get the same sliced view. A pass that keeps
        no outputs ends each batch after its last observer (``EarlyStop``).
        """
        memo: dict[str, Any] = {"x": None, "view": None}
        skip_first = inputs.collect.skip_first
        watch = self.early_stop.watch(layer, observers) if not keep_outputs else nullcontext(lambda linear: None)

        def call(linear: nn.Linear, x: torch.Tensor, seen: Callable[[nn.Module], None]) -> None:
            if memo["x"] is not x:
                memo["x"], memo["view"] = x, (x[:, skip_first:] if skip_first and x.dim() >= 3 else x)
            observers[linear](memo["view"])
            seen(linear)

        with watch as seen:
            handles = [lin.register_forward_pre_hook(lambda m, inp: call(m, inp[0], seen)) for lin in observers]
            try:
                return self._forward(layer, inputs.hidden, inputs.args, "calibration batches", keep_outputs)
            finally:
                for h in handles:
                    h.remove()

    def _collect(self, layer: nn.Module, linears: dict[str, nn.Linear], inputs: Pass,
                 keep_outputs: bool = True) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
        """One pass through ``layer`` that gives each target linear's input statistics, merged over processes.

        The per-channel sums are kept per batch and added in global batch order by ``comm.merge_stats``,
        so the totals do not depend on how the batches were spread over processes. Gram matrices are too
        large to keep per batch: they are summed as the batches come, and so are sketches. Linears that read the same tensor
        (q/k/v, gate/up) share one computation of its statistics.
        """
        c = inputs.collect
        per_batch: list[dict[str, ChannelStats]] = []
        summed: dict[str, dict[str, torch.Tensor]] = {"gram": {}, "sketch": {}}
        memo: dict[str, Any] = {"x": None, "stats": None, "vectors": None}

        def observer(name: str) -> Callable[[torch.Tensor], None]:
            def fn(x: torch.Tensor) -> None:
                if memo["x"] is not x:
                    stats = ChannelStats.of(x, c.gram, c.sketch, c.sketch_every)
                    memo.update(x=x, stats=stats, vectors=stats.vectors_on_cpu())
                batch = per_batch[-1]
                batch[name] = ChannelStats.total([batch[name], memo["vectors"]]) if name in batch else memo["vectors"]
                for kind, sums in summed.items():
                    t = getattr(memo["stats"], kind)
                    if t is not None:
                        sums[name] = sums[name].add_(t) if name in sums else t.clone()

            return fn

        observers = {lin: observer(name) for name, lin in linears.items()}
        new_batch = layer.register_forward_pre_hook(lambda m, inp: per_batch.append({}))
        try:
            outputs = self._forward_observed(layer, observers, inputs, keep_outputs)
        finally:
            new_batch.remove()
        return self.comm.merge_stats(per_batch, summed["gram"], summed["sketch"]), outputs

    @staticmethod
    def _prune_one(pruner: Pruner, name: str, linear: nn.Linear, stats: ChannelStats | None, target: Any) -> LinearResult:
        if pruner.needs_calibration:
            if stats is None:
                raise PruneError(f"no calibration statistics for {name}")
            stats.check_finite(name)
        if not all_finite(linear.weight.detach()):
            raise PruneError(f"non-finite weights in {name}")
        before = count_zeros(linear.weight)
        outcome = pruner.prune(linear, stats, target)
        order = None if outcome.permutation is None else outcome.permutation.detach().to("cpu").contiguous()
        zeros = count_zeros(linear.weight)
        return LinearResult(tuple(linear.weight.shape), target.sparsity, zeros, zeros / linear.weight.numel(),
                            outcome.info, order is not None, order, before)
