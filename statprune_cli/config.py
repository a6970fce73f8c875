"""Run configuration: a typed schema, YAML loading, ``--set`` overrides and validation.

Everything a run does is decided here, before any model loads, so that a typo costs a
second and not an hour. Errors name the key path and what was expected, on one line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from statprune_cli.allocation import ALLOCATIONS
from statprune_cli.errors import ConfigError, shown
from statprune_cli.methods import METHODS, build_method
from statprune_cli.plan import make_plan
from statprune_cli.schema import build, parse_pattern

DTYPES = ("float32", "bfloat16", "float16", "auto")
BUILTIN_DATASETS = ("c4", "wikitext2")
DATASET_PREFIXES = ("text:", "jsonl:", "hf:")
ZEROSHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
# The seven whose mean accuracy the Wanda, SparseGPT and OWL papers report; `eval-zeroshot` runs them by default.
ZEROSHOT_DEFAULT = ZEROSHOT_TASKS[:7]


@dataclass
class ModelConfig:
    """Which checkpoint to prune: a hub id or a local folder, optionally a GGUF file in it."""

    name_or_path: str = ""
    gguf_file: str | None = None
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """A text source: a built-in name (c4, wikitext2), ``text:PATH``, ``jsonl:PATH`` or ``hf:NAME``."""

    shorthand: ClassVar[str] = "dataset"  # a bare string in the YAML is the data set
    dataset: str = "c4"
    data_files: str | None = None
    split: str | None = None
    text_column: str = "text"
    subset: str | None = None


@dataclass
class CalibrationConfig(DataConfig):
    """Calibration windows, drawn as Wanda and SparseGPT do."""

    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    skip_first_tokens: int | None = None  # None: 0, or what a --stats file was collected with
    # auto: each window starts with BOS when the tokenizer adds one by default (BOS then seqlen-1 text tokens);
    # skip_first_tokens counts the BOS position
    bos: bool | str = "auto"


@dataclass
class OwlConfig:
    """OWL's layer-wise sparsity: outliers are scores above ``m`` times their layer's mean; +-``lam`` spread."""

    m: float | None = None  # None: the method's choice (Method.owl_m: 5, the OWL paper's; statprune and magnitude 7)
    lam: float = 0.08


@dataclass
class PruningConfig:
    """What to prune and how; ``options`` belong to the method and are checked by it."""

    method: str = "statprune"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    granularity: str | None = None  # row or matrix; None: the method's own (row for Wanda, matrix for SparseGPT, RIA)
    # N:M only: groups of M taken over the input channels sorted and dealt out by score (RIA); "absorbed": only on
    # linears whose permutation the model absorbs (permute.py: MLP down projections, attention output projections
    # within heads), so that the stored checkpoint is N:M as it stands;
    # None: the method's choice (Method.reallocation)
    reallocation: bool | str | None = None
    # N:M only: one permutation of the residual stream for all the linears that read it, chosen so their groups are
    # spread by importance, stored in the checkpoint (permute.py); None: the method's choice
    residual_permutation: bool | None = None
    # refine the reallocation orders by linear sum assignment, as RIA's --lsa; None: the method's choice (Method.lsa)
    lsa: bool | None = None
    profile: str = "uniform"  # uniform or owl: how the sparsity is spread over the decoder layers
    owl: OwlConfig = field(default_factory=OwlConfig)
    # unstructured only: how a layer's sparsity is spread over its linears, uniform or energy (allocation.py);
    # None: the method's choice (Method.allocation)
    allocation: str | None = None
    allocation_spread: float = 0.1  # energy: each linear within +- this of its layer's sparsity
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    sequential: bool | None = None  # None: the method's choice (Method.sequential)
    true_sequential: bool = False  # inside a layer: q/k/v, then o, then gate/up, then down, each after the ones it reads
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZeroShotConfig:
    """Zero-shot accuracy after pruning (lm-evaluation-harness, 0-shot); an empty ``tasks`` list skips it."""

    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None  # local task files (../shared/data/zeroshot); None: $STATPRUNE_ZEROSHOT_DATA, else the hub
    limit: int | None = None  # the first N examples of each task
    batch_size: int = 1


@dataclass
class EvalConfig:
    """Perplexity (and zero-shot accuracy) after pruning; an empty ``datasets`` list skips perplexity."""

    datasets: list[DataConfig] = field(default_factory=list)
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1
    # auto: each window starts with BOS when the tokenizer adds one by default, and BOS is never scored;
    # false: one token stream, the GPTQ / SparseGPT / Wanda protocol
    bos: bool | str = "auto"
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class OutputConfig:
    dir: str | None = None
    shard_size: str = "5GB"


@dataclass
class RuntimeConfig:
    device: str = "auto"
    offload_activations: bool | str = False  # false: on the device; true or "cpu": CPU memory; "disk": memory-mapped files
    threads: int | None = None
    streaming: bool | str = "auto"  # read layers from the checkpoint one at a time; auto: when it would not fit
    streaming_memory_share: float = 0.5  # auto streams when the checkpoint is larger than this share of free memory
    dist_timeout_minutes: float = 30.0  # under a launcher: how long a rank waits for a hung peer before all stop


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str | int, key: str) -> int:
    """``"5GB"``, ``"500MB"`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(key, f"expected a size such as '5GB' or '500MB', got {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


MAX_YAML_NODES = 10_000  # a config has a few hundred values; an alias bomb of 500 bytes expands to millions


class YamlProblem(yaml.YAMLError):
    """A YAML text that parses but is refused: a duplicate key, or aliases that expand too far."""


class _Loader(yaml.SafeLoader):
    """YAML without base-60 integers: PyYAML would read the pattern ``2:4`` as the number 124.

    A key given twice in one mapping is an error: PyYAML keeps the last, so a second ``pruning:`` section
    would silently replace the first.
    """

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":  # "<<" may repeat
                if key.value in lines:
                    raise YamlProblem(f"duplicate key {shown(key.value)} at lines {lines[key.value]} and "
                                      f"{key.start_mark.line + 1}")
                lines[key.value] = key.start_mark.line + 1
        return node


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(  # 1e-3: a float in YAML 1.2, a string in PyYAML's YAML 1.1
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def expanded_size(node: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """The number of nodes once every alias is expanded, counted on the node graph (each node once) so that an
    alias bomb is refused before any object is built; a YamlProblem past ``limit`` or for a recursive alias."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            if sizes[id(n)] < 0:
                raise YamlProblem(f"a recursive alias at line {n.start_mark.line + 1}")
            return sizes[id(n)]
        sizes[id(n)] = -1  # being counted
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else (
            n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1 + sum(size(c) for c in children)
        if total > limit:
            raise YamlProblem(f"aliases expand to more than {limit} values (from line {n.start_mark.line + 1}); "
                              "write the values out instead")
        sizes[id(n)] = total
        return total

    return size(node)


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error, with the line and column where PyYAML gives them."""
    if isinstance(e, YamlProblem):
        return str(e)
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        return f"not valid YAML: {e.problem}{context} at line {m.line + 1}, column {m.column + 1}"
    return f"not valid YAML: {str(e).splitlines()[0]}"


def parse_yaml(text: str, where: str) -> Any:
    """YAML through the safe loader above; any problem is a ConfigError naming ``where`` (a file or a --set key)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(where, yaml_problem(e)) from None
    except RecursionError:
        raise ConfigError(where, "not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"cannot set inside {shown(p)}, which is not a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings; values are parsed as YAML (``0.6``, ``true``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"expected key.path=value, got {shown(item)}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else None)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(str(path), "config file not found")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(str(path), f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                                         "expected a YAML file") from None
        data = parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(str(path), "expected a YAML mapping at the top level")
    apply_overrides(data, overrides or [])
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg


def from_here(path: Path) -> str:
    """For a relative path not found: where it was looked for (the working folder, not the config file's)."""
    return "" if path.is_absolute() else f" (relative paths are read from the working folder, {Path.cwd()})"


def validate_data(d: DataConfig, key: str) -> None:
    name = d.dataset
    if name not in BUILTIN_DATASETS and not name.startswith(DATASET_PREFIXES):
        raise ConfigError(f"{key}.dataset", f"expected c4, wikitext2, text:PATH, jsonl:PATH or hf:NAME, got {name!r}")
    if name.startswith(("text:", "jsonl:")):
        p = Path(name.split(":", 1)[1])
        if not p.is_file():
            raise ConfigError(f"{key}.dataset", f"file not found: {p}{from_here(p)}")
    if d.data_files is not None and name in BUILTIN_DATASETS and not d.data_files.startswith(("hf:", "en/")):
        if not Path(d.data_files).exists():
            raise ConfigError(f"{key}.data_files", f"file not found: {d.data_files}{from_here(Path(d.data_files))}")


def check_bos(value: bool | str, key: str) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise ConfigError(key, f"expected auto, true or false, got {value!r}")


def check_zeroshot_tasks(tasks: list[str], key: str) -> None:
    for task in tasks:
        if task not in ZEROSHOT_TASKS:
            raise ConfigError(key, f"unknown task {task!r}; expected one of: {', '.join(ZEROSHOT_TASKS)}")


def check_zeroshot_data_dir(path: str | Path, key: str) -> None:
    if not Path(path).is_dir():
        raise ConfigError(key, f"expected a folder of zero-shot task files (as ../shared/data/zeroshot), found none at {path}")


def validate_zeroshot(z: ZeroShotConfig) -> None:
    check_zeroshot_tasks(z.tasks, "eval.zeroshot.tasks")
    if z.data_dir is not None and z.tasks:  # without tasks the folder is never read: a config copied elsewhere still runs
        check_zeroshot_data_dir(z.data_dir, "eval.zeroshot.data_dir")
    for key, val in (("limit", z.limit), ("batch_size", z.batch_size)):
        if val is not None and val < 1:
            raise ConfigError(f"eval.zeroshot.{key}", f"expected an integer >= 1, got {val}")


def validate_allocation(p: PruningConfig, nm: tuple[int, int] | None) -> None:
    if p.allocation is not None and p.allocation not in ALLOCATIONS:
        raise ConfigError("pruning.allocation", f"expected {' or '.join(ALLOCATIONS)}, got {p.allocation!r}")
    if p.allocation == "energy" and nm is not None:
        raise ConfigError("pruning.allocation", f"energy spreads an unstructured sparsity over a layer's linears; pattern "
                                                f"{p.pattern} fixes each linear's (use pattern: unstructured, or leave it unset)")
    if p.allocation == "energy" and not METHODS[p.method].needs_calibration:
        raise ConfigError("pruning.allocation", f"energy weighs each linear's Wanda scores, which need calibration "
                                                f"statistics that {p.method} does not collect (use another method, or uniform)")
    if not 0 <= p.allocation_spread < 1:
        raise ConfigError("pruning.allocation_spread", f"expected a number in [0, 1), got {p.allocation_spread}")


def validate_reordering(p: PruningConfig, nm: tuple[int, int] | None, cfg: Config) -> None:
    """``pruning.residual_permutation: true`` needs an N:M pattern and statistics; ``pruning.lsa: true`` refines a
    reallocation that this run does (set or the method's). Left unset, each is the method's choice, which applies
    only where it can."""
    if p.residual_permutation:
        if nm is None:
            raise ConfigError("pruning.residual_permutation", f"spreads N:M groups; pattern {p.pattern} has none (use "
                                                              "a pattern such as \"2:4\", or leave it unset or false)")
        if not METHODS[p.method].needs_calibration:
            raise ConfigError("pruning.residual_permutation", f"is chosen on calibration statistics, which {p.method} "
                                                              "does not collect: use another method or leave it false")
    if p.lsa is not True:
        return
    if nm is None:
        raise ConfigError("pruning.lsa", f"refines N:M channel reallocation; pattern {p.pattern} has none (use a pattern "
                                         "such as \"2:4\", or leave lsa false)")
    plan = make_plan(cfg, build_method(p.method, p.options, p.pattern))
    if not (plan.reallocation or plan.residual_permutation):
        raise ConfigError("pruning.lsa", f"refines channel reallocation, which {p.method} does not do here: set "
                                         "pruning.reallocation or pruning.residual_permutation, or leave lsa false")


def validate(cfg: Config) -> None:
    """Checks that need no model; ``validate_for_model`` does the rest once the config.json is read."""
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path", "required: a hub id or a local folder")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError("model.dtype", f"expected one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    c = cfg.calibration
    validate_data(c, "calibration")
    for key, val, lo in (("nsamples", c.nsamples, 1), ("seqlen", c.seqlen, 2), ("batch_size", c.batch_size, 1)):
        if val < lo:
            raise ConfigError(f"calibration.{key}", f"expected an integer >= {lo}, got {val}")
    check_bos(c.bos, "calibration.bos")
    if c.skip_first_tokens is not None and not 0 <= c.skip_first_tokens < c.seqlen:
        raise ConfigError("calibration.skip_first_tokens", f"expected 0 <= k < seqlen ({c.seqlen}), got {c.skip_first_tokens}")
    p = cfg.pruning
    if p.method not in METHODS:
        raise ConfigError("pruning.method", f"expected one of {', '.join(sorted(METHODS))}, got {p.method!r}")
    if not 0.0 <= p.sparsity < 1.0:
        raise ConfigError("pruning.sparsity", f"expected a number in [0, 1), got {p.sparsity}")
    nm = parse_pattern(p.pattern)
    if p.granularity not in (None, "row", "matrix"):
        raise ConfigError("pruning.granularity", f"expected 'row' or 'matrix', got {p.granularity!r}")
    if isinstance(p.reallocation, str) and p.reallocation != "absorbed":
        raise ConfigError("pruning.reallocation", f"expected true, false or absorbed, got {p.reallocation!r}")
    if p.reallocation and nm is None:
        raise ConfigError("pruning.reallocation", f"channel reallocation spreads N:M groups; pattern {p.pattern} has none "
                                                  "(use a pattern such as \"2:4\", or leave reallocation unset or false)")
    validate_profile(p, nm)
    validate_allocation(p, nm)
    for key, pats in (("targets", p.targets), ("ignore", p.ignore)):
        for i, pat in enumerate(pats):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ConfigError(f"pruning.{key}[{i}]", f"invalid regular expression: {e}") from None
    if not p.targets:
        raise ConfigError("pruning.targets", "expected at least one target")
    METHODS[p.method].Options.from_dict(p.options)
    validate_reordering(p, nm, cfg)
    validate_eval(cfg.eval)
    validate_runtime(cfg)


def validate_eval(e: EvalConfig) -> None:
    """The eval section, data sets and zero-shot tasks included."""
    for i, d in enumerate(e.datasets):
        validate_data(d, f"eval.datasets[{i}]")
    if e.seqlen < 2:
        raise ConfigError("eval.seqlen", f"expected an integer >= 2, got {e.seqlen}")
    if e.max_tokens is not None and e.max_tokens < e.seqlen:
        raise ConfigError("eval.max_tokens", f"expected at least eval.seqlen ({e.seqlen}) tokens, got {e.max_tokens}")
    if e.batch_size < 1:
        raise ConfigError("eval.batch_size", f"expected an integer >= 1, got {e.batch_size}")
    check_bos(e.bos, "eval.bos")
    validate_zeroshot(e.zeroshot)


def validate_runtime(cfg: Config) -> None:
    """The output and runtime sections (and the one model key streaming depends on)."""
    parse_size(cfg.output.shard_size, "output.shard_size")
    if cfg.runtime.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.runtime.device):
        raise ConfigError("runtime.device", f"expected auto, cpu, cuda or cuda:N, got {cfg.runtime.device!r}")
    r = cfg.runtime
    if isinstance(r.offload_activations, str) and r.offload_activations not in ("cpu", "disk"):
        raise ConfigError("runtime.offload_activations", f"expected true (or cpu), false or disk, got {r.offload_activations!r}")
    if isinstance(r.streaming, str) and r.streaming != "auto":
        raise ConfigError("runtime.streaming", f"expected true, false or auto, got {r.streaming!r}")
    if r.streaming is True and cfg.model.gguf_file:
        raise ConfigError("runtime.streaming", "a GGUF checkpoint is dequantized whole on load and cannot stream; convert it "
                                               "to safetensors (save_pretrained) or set runtime.streaming: false")
    if not 0 < r.streaming_memory_share <= 1:
        raise ConfigError("runtime.streaming_memory_share", f"expected a number in (0, 1], got {r.streaming_memory_share}")
    if not r.dist_timeout_minutes > 0:
        raise ConfigError("runtime.dist_timeout_minutes", f"expected a number of minutes > 0, got {r.dist_timeout_minutes}")
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        raise ConfigError("runtime.threads", f"expected an integer >= 1, got {cfg.runtime.threads}")


def validate_profile(p: PruningConfig, nm: tuple[int, int] | None) -> None:
    if p.profile not in ("uniform", "owl"):
        raise ConfigError("pruning.profile", f"expected 'uniform' or 'owl', got {p.profile!r}")
    if p.profile != "owl":
        return
    if nm is not None:
        raise ConfigError("pruning.profile", f"owl spreads an unstructured sparsity over layers; pattern {p.pattern} "
                                             "fixes every layer's sparsity (use pattern: unstructured)")
    if p.owl.m is not None and p.owl.m <= 0:
        raise ConfigError("pruning.owl.m", f"expected a number > 0, got {p.owl.m}")
    if not 0 <= p.owl.lam or p.sparsity - p.owl.lam < 0 or p.sparsity + p.owl.lam >= 1:
        raise ConfigError("pruning.owl.lam", f"expected 0 <= lam with sparsity +- lam inside [0, 1), got lam {p.owl.lam} "
                                             f"at sparsity {p.sparsity}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
