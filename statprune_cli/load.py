"""Load a checkpoint (hub id, local folder or GGUF file) and check the config against it.

``check_against_model`` builds the model on the meta device (no weights, seconds even for 70B)
so that target, N:M and sequence-length errors surface before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from statprune_cli.config import CalibrationConfig, Config, EvalConfig, ModelConfig, parse_pattern
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.layers import find_decoder_layers, target_linears
from statprune_cli.permute import residual_plan

def torch_dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _source(mc: ModelConfig) -> dict:
    kw: dict = {"revision": mc.revision, "trust_remote_code": mc.trust_remote_code}
    if mc.gguf_file:
        kw["gguf_file"] = mc.gguf_file
    return kw


def _input_error(mc: ModelConfig, what: str, e: Exception) -> InputError:
    where = f"{mc.name_or_path}" + (f" (gguf_file {mc.gguf_file})" if mc.gguf_file else "")
    return InputError(f"model.name_or_path: cannot load the {what} of {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub id (``owner/name``): transformers would report a missing folder as a malformed repo id."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def safetensors_header(path: Path, key: str = "model.name_or_path") -> tuple[int, dict[str, Any], bytes]:
    """(offset of the data, the JSON header, its raw bytes) of a safetensors file, checked against the file's size,
    so that a truncated file is named as such instead of failing deep inside a loader."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or 8 + length > size:
            raise InputError(f"{key}: {path} is truncated or not a safetensors file ({size} bytes, its header "
                             f"says {8 + length if len(head) == 8 else 'nothing'})")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise InputError(f"{key}: {path} is not a safetensors file (its header is not a tensor index)") from None
    if 8 + length + end > size:
        raise InputError(f"{key}: {path} is truncated: {size} bytes, its header describes {8 + length + end}")
    return 8 + length, header, raw


def check_weight_files(mc: ModelConfig) -> None:
    """A local checkpoint's safetensors files, whole: a truncated copy is named before any weight is read."""
    folder = Path(mc.name_or_path)
    if folder.is_dir() and not mc.gguf_file:
        for path in sorted(folder.glob("*.safetensors")):
            safetensors_header(path)


ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = ("F32", "F16", "BF16")  # written in model.dtype; other tensors as stored
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def output_bytes(mc: ModelConfig) -> int | None:
    """About the size of a pruned output (dense weights in ``model.dtype``) from the checkpoint's safetensors
    headers; a local GGUF or .bin checkpoint by its size on disk (GGUF: a lower bound, it is quantized); None when
    nothing tells (only writability is then checked)."""
    folder = Path(mc.name_or_path)
    if not folder.is_dir():
        return None if looks_local(mc.name_or_path) or mc.gguf_file else _hub_output_bytes(mc)
    files = [] if mc.gguf_file else sorted(folder.glob("*.safetensors"))
    if not files:
        others = [folder / mc.gguf_file] if mc.gguf_file else list(folder.glob("*.bin"))
        return sum(f.stat().st_size for f in others if f.is_file()) or None
    counts: dict[str, int] = {}
    for path in files:
        for name, info in safetensors_header(path)[1].items():
            if name != "__metadata__":
                size = ELEMENT_BYTES.get(info["dtype"], 1)
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + \
                    (info["data_offsets"][1] - info["data_offsets"][0]) // size
    return _weights_bytes(counts, mc.dtype)


def _weights_bytes(counts: dict[str, int], dtype: str) -> int:
    """Elements per stored dtype (safetensors' names: F32, BF16, I64, ...) as the bytes the output takes."""
    return sum(n * (DTYPE_BYTES.get(dtype, ELEMENT_BYTES[stored]) if stored in FLOATS else ELEMENT_BYTES.get(stored, 1))
               for stored, n in counts.items())


def _hub_output_bytes(mc: ModelConfig) -> int | None:
    """A hub id's safetensors headers: from the local cache when the checkpoint is there, else from the hub (a few
    kB of range reads); None when neither answers (offline and not cached, gated, no safetensors)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        cached = Path(snapshot_download(mc.name_or_path, revision=mc.revision, local_files_only=True,
                                        allow_patterns=["*.safetensors"]))
        if any(cached.glob("*.safetensors")):
            return output_bytes(dataclasses.replace(mc, name_or_path=str(cached)))
    except Exception:  # the hub client raises many types for "not in the cache"
        pass
    try:
        counts = HfApi().get_safetensors_metadata(mc.name_or_path, revision=mc.revision).parameter_count
    except Exception:  # offline, not found, gated, no safetensors: the run itself will say which, if it matters
        return None
    return _weights_bytes(dict(counts), mc.dtype)


def check_seqlen(key: str, seqlen: int, default: int, config: PretrainedConfig, how: str | None = None) -> None:
    """Windows no longer than the model's context; an unset key that got the default is told what to set."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        unset = f"; {seqlen} is the default: set {how or key} to at most {context}" if seqlen == default else ""
        raise ConfigError(key, f"expected at most the model's context ({context} tokens), got {seqlen}{unset}")


def load_model_config(mc: ModelConfig) -> PretrainedConfig:
    """The checkpoint's config.json (every command reads it first), after checking its weight files are whole."""
    check_weight_files(mc)
    if looks_local(mc.name_or_path) and not Path(mc.name_or_path).expanduser().exists():
        raise ConfigError("model.name_or_path", f"no folder {mc.name_or_path} (a hub id is owner/name)")
    if mc.gguf_file and Path(mc.name_or_path).is_dir() and not (Path(mc.name_or_path) / mc.gguf_file).is_file():
        raise ConfigError("model.gguf_file", f"no file {mc.gguf_file} in {mc.name_or_path}")
    try:
        return AutoConfig.from_pretrained(mc.name_or_path, **_source(mc))
    except (OSError, ValueError, KeyError) as e:
        raise _input_error(mc, "config", e) from None


def load_tokenizer(mc: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(mc.name_or_path, **_source(mc))
    except (OSError, ValueError, KeyError) as e:
        raise _input_error(mc, "tokenizer", e) from None


def load_model(mc: ModelConfig) -> nn.Module:
    """Weights on CPU in ``model.dtype``, in eval mode, with GGUF quantization metadata dropped."""
    check_weight_files(mc)
    try:
        model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=torch_dtype(mc.dtype), **_source(mc))
    except (OSError, ValueError, KeyError) as e:
        raise _input_error(mc, "weights", e) from None
    # A GGUF checkpoint is dequantized on load; its quantizer must not follow the dense weights into the output.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = False
    return model.eval()


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_against_model(cfg: Config, config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """Target, N:M and sequence-length checks that need the architecture but no weights.

    Returns the shape (out, in) of every target linear, by full module name.
    """
    skeleton = meta_model(config, cfg.model.trust_remote_code)
    layers_name, layers = find_decoder_layers(skeleton)
    p = cfg.pruning
    names = target_linears(layers[0], f"{layers_name}.0", p.targets, p.ignore)
    found = {n: m for i in range(len(layers)) for n, m in target_linears(layers[i], f"{layers_name}.{i}", p.targets, p.ignore).items()}
    if not found:
        raise ConfigError("pruning.targets", f"matches no linear layer of the decoder layers (e.g. {layers_name}.0.*); "
                                             f"linears of layer 0: {', '.join(n.rsplit('.', 2)[-2] + '.' + n.rsplit('.', 1)[-1] for n in names) or 'none'}")
    nm = parse_pattern(p.pattern)
    if nm is not None:
        for name, lin in found.items():
            if lin.in_features % nm[1]:
                raise ConfigError("pruning.pattern", f"M={nm[1]} does not divide in_features={lin.in_features} of {name}")
    if p.residual_permutation:  # the method's default instead skips an architecture it cannot permute, with a note
        plan = residual_plan(skeleton, layers_name, config.hidden_size)
        if isinstance(plan, str):
            raise ConfigError("pruning.residual_permutation", f"not known for this architecture: {plan}")
    check_seqlen("calibration.seqlen", cfg.calibration.seqlen, CalibrationConfig.seqlen, config)
    if cfg.eval.datasets:  # without a data set no window is cut: an unset eval.seqlen must not stop the run
        check_seqlen("eval.seqlen", cfg.eval.seqlen, EvalConfig.seqlen, config)
    return {n: (m.out_features, m.in_features) for n, m in found.items()}
