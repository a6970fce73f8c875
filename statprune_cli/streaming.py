"""Stream decoder layers from the checkpoint and into the output, so the model never sits in memory whole.

The model is a skeleton whose decoder layers hold no weights (accelerate's ``init_empty_weights``);
embeddings, final norm and head are loaded once. When the engine reaches layer i, its tensors are
read from the checkpoint's safetensors shards (``safe_open`` reads only those), the layer is
pruned, written to its own output shard at once, and its weights go back to the meta device.
Peak memory is one decoder layer plus the calibration activations plus the embeddings.

The output is built in ``.<name>.partial`` beside the output folder, which also records progress
after every layer (``progress.json``, the activations entering the next layer, the random state),
so a killed run started again with the same config continues from the next layer. The record
also holds what the config does not say: the checkpoint's identity, the calibration windows' hash
and the thread count; a resume that finds any of them changed is refused (``Progress.load``).

Under torchrun every process reads each layer from the checkpoint and prunes it identically; rank 0
alone writes shards, ``progress.json`` and the final folder. Each process saves its own
activations (``inputs-0000k-rankR.safetensors``), all of them before ``progress.json`` points at
them, so a resume needs the same number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from statprune_cli.config import ModelConfig
from statprune_cli.distributed import Communicator
from statprune_cli.engine import LayerResult
from statprune_cli.errors import InputError, PruneError
from statprune_cli.export import check_finite_tensors, replace_dir, write_extras
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import safetensors_header, torch_dtype
from statprune_cli.masks import count_zeros
from statprune_cli.memory import trim_heap
from statprune_cli.permute import ResidualPlan

INDEX = "model.safetensors.index.json"


def _write_atomic(path: Path, write: Any) -> None:
    """``write(tmp_path)``, then rename over ``path``: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read by name on demand."""

    def __init__(self, folder: Path, key: str = "model.name_or_path") -> None:
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}  # noqa: SIM118 - not a dict
        else:
            raise InputError(f"{key}: streaming reads safetensors weights, and {folder} has neither model.safetensors "
                             f"nor {INDEX}")

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each read with plain file I/O into memory of its own.

        Not through ``safe_open``: its tensors live in a memory map of the whole file, whose touched
        pages stay resident while any tensor from it lives, and copying out of it holds a tensor
        twice; reading the bytes straight into a fresh tensor holds it once.
        """
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, ns in by_file.items():
            start, header = read_header(path)
            with open(path, "rb") as f:
                for n in ns:
                    info = header[n]
                    t = torch.empty(info["shape"], dtype=TORCH_DTYPES[info["dtype"]])
                    begin, end = info["data_offsets"]
                    f.seek(start + begin)
                    if end > begin and f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                        raise InputError(f"model.name_or_path: {path} is truncated at tensor {n}")
                    out[n] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.files


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, the JSON header) of a safetensors file (a truncated one is an InputError naming it)."""
    return safetensors_header(path)[:2]


def resolve_folder(mc: ModelConfig) -> Path:
    """A local folder as is; a hub id downloaded (config, tokenizer and safetensors files only)."""
    path = Path(mc.name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(mc.name_or_path, revision=mc.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub client raises many types: offline, not found, gated
        raise InputError(f"model.name_or_path: cannot download {mc.name_or_path} for streaming: {e}") from None


def _state_names(module: nn.Module) -> list[str]:
    """Parameter and persistent-buffer names, tied tensors once (the first name, as save_pretrained keeps)."""
    seen, names = set(), []
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def _outside_tensors(model: nn.Module, layers_name: str) -> dict[str, torch.Tensor]:
    """Every state tensor outside the decoder layers (embeddings, final norm, head), a tied one under each of its names."""
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(layers_name + ".")}


def _outside_names(model: nn.Module, layers_name: str) -> list[str]:
    """The names of those tensors, tied ones once (the first name, as save_pretrained keeps)."""
    outside = _outside_tensors(model, layers_name)
    return [n for n in _state_names(model) if n in outside]


def load_outside(model: nn.Module, checkpoint: Checkpoint, layers_name: str, dtype: torch.dtype | None,
                 device: torch.device | str = "cpu") -> None:
    """Read every tensor outside the decoder layers from ``checkpoint`` into ``model`` on ``device``."""
    names = [n for n in _outside_names(model, layers_name) if n in checkpoint]
    for n, t in checkpoint.read(names, dtype).items():
        set_module_tensor_to_device(model, n, device, value=t)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_skeleton(mc: ModelConfig, config: PretrainedConfig, checkpoint: Checkpoint) -> nn.Module:
    """The model with every weight outside the decoder layers loaded and the layers left on the meta device."""
    dtype = torch_dtype(mc.dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=mc.trust_remote_code,
                                                 **({} if dtype == "auto" else {"dtype": dtype}))
    layers_name = find_decoder_layers(model)[0]
    tied = getattr(config, "tie_word_embeddings", False)
    for n in _outside_names(model, layers_name):
        if n not in checkpoint and not (tied and n.endswith("lm_head.weight")):
            raise InputError(f"model.name_or_path: the checkpoint in {checkpoint.folder} has no tensor {n}")
    load_outside(model, checkpoint, layers_name, None if dtype == "auto" else dtype)
    model.config.use_cache = False
    return model.eval()


class StreamedLayers:
    """The engine's layer I/O for a skeleton model: read a layer's tensors when it is needed, drop them after."""

    def __init__(self, checkpoint: Checkpoint, layers_name: str, dtype: torch.dtype | str) -> None:
        self.checkpoint, self.layers_name = checkpoint, layers_name
        self.dtype = None if dtype == "auto" else dtype
        self.residual: tuple[ResidualPlan, torch.Tensor] | None = None  # applied to what is read from the checkpoint

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        prefix = f"{self.layers_name}.{index}."
        names = _state_names(layer)
        present = [n for n in names if prefix + n in self.checkpoint]
        for n in names:
            if n not in present and not n.endswith(".bias"):
                raise PruneError(f"the checkpoint in {self.checkpoint.folder} has no tensor {prefix + n}")
        tensors = self.checkpoint.read([prefix + n for n in present], self.dtype)
        for n in names:
            t = tensors.get(prefix + n)
            if t is None:  # a bias the architecture has but the checkpoint omits: zero
                meta = layer.get_parameter(n)
                t = torch.zeros(meta.shape, dtype=meta.dtype)
            set_module_tensor_to_device(layer, n, device, value=t)
        if self.residual is not None:
            self.residual[0].permute_layer(layer, self.residual[1])

    def release(self, index: int, layer: nn.Module) -> None:
        for n in _state_names(layer):
            set_module_tensor_to_device(layer, n, "meta")
        trim_heap(collect=False)  # without it, freed heap pages can pile up from layer to layer (seen: +50 MiB per layer)

    def fetch_outside(self, model: nn.Module, device: torch.device) -> None:
        """Embeddings, final norm and head back from the checkpoint if ``release_outside`` dropped them."""
        if any(t.is_meta for t in _outside_tensors(model, self.layers_name).values()):
            load_outside(model, self.checkpoint, self.layers_name, self.dtype, device)
            if self.residual is not None:
                self.residual[0].permute_outside(model, self.residual[1])

    def permute_residual(self, model: nn.Module, plan: ResidualPlan, order: torch.Tensor) -> None:
        """The layers as they are read; the weights outside them now, or when they are read again if dropped."""
        self.residual = (plan, order)
        if not any(t.is_meta for t in _outside_tensors(model, self.layers_name).values()):
            plan.permute_outside(model, order)

    def release_outside(self, model: nn.Module) -> None:
        """Drop the weights outside the layers while the layers run: the embeddings can be as large as a layer or two.

        The engine needs them only to capture the first layer's inputs; pruning does not change them, and
        they are read again from the checkpoint to be written or to evaluate.
        """
        for n in _outside_tensors(model, self.layers_name):  # every name: a tied head holds the embeddings under its own
            set_module_tensor_to_device(model, n, "meta")
        trim_heap(collect=False)


class ShardWriter:
    """The output's weights as they are produced: one shard per decoder layer and one for everything else."""

    def __init__(self, folder: Path, num_layers: int) -> None:
        self.folder, self.total = folder, num_layers + 1

    def shard(self, k: int) -> Path:
        return self.folder / f"model-{k + 1:05d}-of-{self.total:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """One shard; its header also counts its zeros, so the report's sparsity needs no second read."""
        data = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        check_finite_tensors(data)
        zeros = sum(count_zeros(t) for t in data.values())
        numel = sum(t.numel() for t in data.values())
        metadata = {"format": "pt", "statprune_zeros": str(zeros), "statprune_numel": str(numel)}
        _write_atomic(self.shard(k), lambda p: write_safetensors(p, data, metadata))

    def write_layer(self, index: int, prefix: str, layer: nn.Module) -> None:
        state = layer.state_dict()
        self.write(index, {f"{prefix}.{index}.{n}": state[n] for n in _state_names(layer)})

    def write_rest(self, model: nn.Module, layers_name: str) -> None:
        state = model.state_dict()
        self.write(self.total - 1, {n: state[n] for n in _outside_names(model, layers_name)})

    def finish(self) -> None:
        """The index that transformers reads, built from the shards on disk (so a resumed run gets it right)."""
        weight_map, total = {}, 0
        for k in range(self.total):
            path = self.shard(k)
            if not path.is_file():
                raise PruneError(f"output shard {path.name} is missing")
            for n, info in read_header(path)[1].items():
                if n != "__metadata__":
                    weight_map[n] = path.name
                    total += info["data_offsets"][1] - info["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_atomic(self.folder / INDEX, lambda p: p.write_text(json.dumps(index, indent=2)))


DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format, written tensor by tensor straight from memory.

    ``safetensors.torch.save_file`` first builds the whole file as one bytes object, which doubles a
    shard's memory at the moment it is written (the embeddings' shard included); the format is an
    8-byte header length, a JSON header and the raw little-endian data, so it is written here directly.
    ``safe_open`` reads it back (tests compare it with save_pretrained's files).
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def folder_sparsity(checkpoint: Checkpoint) -> dict[str, float | int]:
    """Zeros over every tensor of an output that ``ShardWriter`` wrote, from the counts in the shards' headers."""
    zeros = total = 0
    for path in sorted(set(checkpoint.files.values())):
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "statprune_zeros" not in meta:
            raise PruneError(f"{path.name} was not written by this run (no zero count in its header)")
        zeros += int(meta["statprune_zeros"])
        total += int(meta["statprune_numel"])
    return {"zeros": zeros, "parameters": total, "sparsity": zeros / total if total else 0.0}


# ---------------------------------------------------------------- resume


SAMPLE_BYTES = 1 << 20


def file_identity(path: Path) -> dict[str, Any]:
    """A safetensors file's size and a sha256 of its header and of the first and last MiB of its data (a fine-tune
    of the same shapes has the same header): cheap for a checkpoint of any size, and any rewrite changes it."""
    start, _, raw = safetensors_header(path)
    size = path.stat().st_size
    digest = hashlib.sha256(raw)
    with open(path, "rb") as f:
        for offset in (start, max(start, size - SAMPLE_BYTES)):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256": digest.hexdigest()}


def checkpoint_identity(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a resumed run must find again: each weight file's ``file_identity``, and the hub commit where the folder
    is a hub snapshot (``.../snapshots/<commit>``)."""
    files = {path.name: file_identity(path) for path in sorted(set(checkpoint.files.values()))}
    folder = checkpoint.folder.resolve()
    return {"files": files, "commit": folder.name if folder.parent.name == "snapshots" else None}


def windows_sha256(batches: list[torch.Tensor] | None) -> str | None:
    """The calibration windows' token ids, hashed: a data file edited in place, another tokenizer or seed."""
    if batches is None:
        return None
    digest = hashlib.sha256()
    for b in batches:
        digest.update(b.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def identity_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between two runs' inputs (``StreamingOutput.inputs``), one phrase each."""
    if old is None:
        return ["it records no checkpoint identity (an older statprune)"]
    out = []
    a, b = old["checkpoint"]["files"], new["checkpoint"]["files"]
    for name in sorted(set(a) | set(b)):
        if name not in b or name not in a:
            out.append(f"weight file {name} {'removed' if name not in b else 'added'}")
        elif a[name]["bytes"] != b[name]["bytes"]:
            out.append(f"{name}: {a[name]['bytes']} -> {b[name]['bytes']} bytes")
        elif a[name]["sha256"] != b[name]["sha256"]:
            out.append(f"{name}: its contents changed")
    if old["checkpoint"]["commit"] != new["checkpoint"]["commit"]:
        out.append(f"hub commit {old['checkpoint']['commit']} -> {new['checkpoint']['commit']}")
    if old["calibration_sha256"] != new["calibration_sha256"]:
        out.append("the calibration windows (the data, the tokenizer or their text changed)")
    if old.get("stats") != new.get("stats"):  # records without the key predate --stats in the identity
        out.append("the --stats file (another file, other contents, or given on one run only)")
    return out


class Progress:
    """What a streaming run has finished, recorded in its partial folder after every layer.

    ``progress.json`` is written last, by rank 0, once every process's activations for its next
    layer are on disk, so a kill at any moment leaves either the previous record or the new one,
    never a mix. Activation files older than the record are deleted after it.

    A resume is refused when the inputs changed (``identity_changes``), and when the thread count
    differs from the record's: a matrix product's float sums depend on how many threads split it, so
    the layers after a resume would differ by rounding (~1e-8) from those one uninterrupted run gives.
    Refused rather than warned: a resumed run is meant to be the run, bit for bit.
    """

    def __init__(self, folder: Path, comm: Communicator | None = None, inputs: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.path = folder / "progress.json"
        self.comm = comm or Communicator()
        self.inputs_identity = inputs

    def inputs(self, next_layer: int) -> Path:
        """This process's activations entering ``next_layer``."""
        return self.folder / f"inputs-{next_layer:05d}{self.comm.suffix}.safetensors"

    def load(self, config: dict[str, Any]) -> tuple[int, list[torch.Tensor], list[LayerResult], dict[str, Any]] | None:
        """(next layer, its input activations, results so far, extra) of a partial run of ``config``; None if fresh."""
        if not self.path.is_file():
            return None
        record = json.loads(self.path.read_text())
        differences = config_differences(record["config"], config)
        # the plan repeats what a config key decided: name the key, and the plan only where no key differs
        differences = [d for d in differences if not d.startswith("plan")] or differences
        if differences:
            hint = ("it was started by another statprune version whose defaults differ, so its layers would not match; "
                    "delete the folder to start over" if all(d.startswith("plan") for d in differences)
                    else "run that config again to resume it, or delete the folder to start over")
            raise InputError(f"output.dir: {self.folder} holds a partial run of another config ({'; '.join(differences[:3])}); "
                             + hint)
        world = record.get("world_size", 1)
        if world != self.comm.world_size:
            raise InputError(f"output.dir: {self.folder} holds a partial run on {world} process(es); resume it with "
                             f"{world} (got {self.comm.world_size}), or delete the folder to start over")
        changes = identity_changes(record.get("inputs"), self.inputs_identity) if self.inputs_identity else []
        if changes:
            raise InputError(f"output.dir: {self.folder} holds a partial run of other inputs ({'; '.join(changes[:3])}); "
                             f"its layers would not match these: delete {self.folder} to start over")
        threads = record.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            raise InputError(f"output.dir: {self.folder} holds a partial run on {threads} thread(s), this one has "
                             f"{torch.get_num_threads()}: its later layers would differ by rounding; set "
                             f"runtime.threads: {threads} to resume, or delete {self.folder} to start over")
        tensors = load_file(str(self.inputs(record["next_layer"])))
        hidden = [tensors[f"batch.{j}"] for j in range(sum(k.startswith("batch.") for k in tensors))]
        torch.set_rng_state(tensors["rng_state"])
        results = [LayerResult.from_record(r) for r in record["results"]]
        return record["next_layer"], hidden, results, record["extra"]

    def save(self, config: dict[str, Any], next_layer: int, hidden: list[torch.Tensor], results: list[LayerResult],
             extra: dict[str, Any]) -> None:
        tensors = {f"batch.{j}": h.detach().to("cpu").contiguous() for j, h in enumerate(hidden)}
        tensors["rng_state"] = torch.get_rng_state()
        _write_atomic(self.inputs(next_layer), lambda p: write_safetensors(p, tensors, {}))  # no bytes copy of all activations
        self.comm.barrier()  # every process's activations are on disk before the record points at them
        if not self.comm.is_main:
            return
        record = {"config": config, "next_layer": next_layer, "world_size": self.comm.world_size,
                  "threads": torch.get_num_threads(), "inputs": self.inputs_identity,
                  "results": [r.record() for r in results], "extra": extra}
        _write_atomic(self.path, lambda p: p.write_text(json.dumps(record)))
        for old in self.folder.glob("inputs-*.safetensors"):
            if int(old.name[len("inputs-"):][:5]) < next_layer:
                old.unlink()

    def clear(self) -> None:
        """A finished run leaves no progress files behind."""
        self.path.unlink(missing_ok=True)
        for f in self.folder.glob("inputs-*.safetensors"):
            f.unlink()


IGNORED_FOR_RESUME = ("runtime.threads", "runtime.device", "runtime.offload_activations")


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every value that differs (settings that cannot change the output excepted)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b and key not in IGNORED_FOR_RESUME:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


@contextmanager
def partial_dir(path: Path, rename: bool = True) -> Iterator[Path]:
    """``.<name>.partial`` beside ``path``: kept when the run fails (to resume), renamed to ``path`` when it succeeds
    (by the one process that passes ``rename``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial"
    partial.mkdir(exist_ok=True)
    yield partial
    if rename:
        replace_dir(partial, path)


@contextmanager
def tokenizer_folder(out: Path, suffix: str = "") -> Iterator[Path]:
    """Where a streaming run keeps its tokenizer's files until they are copied into the output: ``.NAME.tokenizer``
    beside it (``suffix``: one per process), not in /tmp, so that a killed run leaves nothing outside its output's
    folder; the next run on the output replaces what a killed one left."""
    folder = out.parent / f".{out.name}.tokenizer{suffix}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def available_memory() -> int:
    """Bytes the kernel says are available (MemAvailable), or total physical memory where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(mc: ModelConfig, setting: bool | str, share: float) -> bool:
    """``runtime.streaming``: true, false, or auto = a local safetensors checkpoint larger than ``share`` of free memory."""
    if setting != "auto":
        return bool(setting)
    path = Path(mc.name_or_path)
    if mc.gguf_file or not path.is_dir():
        return False
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return size > share * available_memory()


class StreamingOutput:
    """A streaming prune's output: shards written as layers finish, progress recorded, resumable."""

    def __init__(self, folder: Path, checkpoint: Checkpoint, layers_name: str, num_layers: int, config: dict[str, Any],
                 comm: Communicator | None = None, calibration: list[torch.Tensor] | None = None,
                 stats: Path | None = None) -> None:
        self.folder, self.checkpoint, self.layers_name = folder, checkpoint, layers_name
        self.comm = comm or Communicator()
        self.writer = ShardWriter(folder, num_layers)
        inputs = {"checkpoint": checkpoint_identity(checkpoint), "calibration_sha256": windows_sha256(calibration),
                  "stats": None if stats is None else file_identity(stats)}
        self.progress = Progress(folder, self.comm, inputs)
        self.config = config

    def resume(self) -> tuple[int, list[torch.Tensor], list[LayerResult]] | None:
        state = self.progress.load(self.config)
        return None if state is None else state[:3]

    def layer_done(self, index: int, layer: nn.Module, next_inputs: list[torch.Tensor], results: list[LayerResult]) -> None:
        if self.comm.is_main:
            self.writer.write_layer(index, self.layers_name, layer)
            extras = results[-1].extras()
            if extras:  # on disk before progress.json moves on, so a resumed run still has them
                _write_atomic(self.extras_piece(index), lambda p: write_safetensors(p, extras, {}))
        self.progress.save(self.config, index + 1, next_inputs, results, {})
        # tests: simulate a crash right here, in every process ("1") or in one ("1@rank1")
        crash_after = os.environ.get("STATPRUNE_TEST_KILL_AFTER_LAYER")
        if crash_after in (str(index), f"{index}@rank{self.comm.rank}"):
            os.kill(os.getpid(), 9)

    def extras_piece(self, index: int) -> Path:
        return self.folder / f"extras-{index:05d}.safetensors"

    def finish_weights(self, model: nn.Module, io: StreamedLayers) -> Checkpoint:
        """Write what is not in a decoder layer, the index and the methods' extra tensors (rank 0); the folder is then
        a checkpoint to evaluate. ``io`` reads the weights outside the layers back if the engine dropped them."""
        io.fetch_outside(model, torch.device("cpu"))
        if self.comm.is_main:
            self.writer.write_rest(model, self.layers_name)
            self.writer.finish()
            pieces = sorted(self.folder.glob("extras-*.safetensors"))
            if pieces:
                write_extras(self.folder, {k: t for p in pieces for k, t in load_file(str(p)).items()})
                for p in pieces:
                    p.unlink()
        self.comm.barrier()
        return Checkpoint(self.folder, "output.dir")
