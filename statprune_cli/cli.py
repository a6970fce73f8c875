"""The ``statprune`` command line: calibrate, prune, eval-ppl, eval-zeroshot and export, each driven by one YAML config.

Exit codes: 0 success, 2 bad input (config, files, data), 1 a run that failed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from statprune_cli import __version__
from statprune_cli.errors import InputError

if typing.TYPE_CHECKING:
    from statprune_cli.ui import UI

# Help texts are rich markup: "\\[eval]" prints "[eval]"; a bare "[eval]" would vanish as a tag.
app = typer.Typer(
    name="statprune",
    help="Prune LLMs after training with statistically corrected magnitude pruning. No retraining, no gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: key.path=value (YAML value). Repeatable.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no log lines; errors still go to stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (for CI jobs and scripts).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output, once the new one is complete.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (default: the config's, else auto).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32, bfloat16, float16 or auto (default: the config's, else float32).")]
GgufOpt = Annotated[Optional[str], typer.Option(help="GGUF file inside the model folder.")]


@dataclass
class Output:
    """How every command speaks."""

    quiet: QuietOpt = False
    as_json: JsonOpt = False

    def ui(self) -> UI:
        """Progress and log lines: silenced by --quiet, and on every process but rank 0 under torchrun."""
        from statprune_cli.distributed import is_main_process
        from statprune_cli.ui import UI

        return UI(quiet=self.quiet or not is_main_process())


@dataclass
class ModelChoice:
    """What an evaluation command evaluates: a YAML config (with --set) or a model folder / hub id (with --gguf-file),
    then --device and --dtype."""

    device: DeviceOpt = None
    dtype: DtypeOpt = None
    gguf_file: GgufOpt = None
    set_: SetOpt = None


@dataclass
class PplData:
    """eval-ppl's data and windows; each unset one keeps the config's value, else its default."""

    dataset: Annotated[Optional[str], typer.Option(help="wikitext2, c4, text:PATH, jsonl:PATH or hf:NAME (default: the config's eval.datasets, else wikitext2).")] = None
    data_files: Annotated[Optional[str], typer.Option(help="Local file or folder of the data set (e.g. ../shared/data/wikitext-2-raw).")] = None
    split: Annotated[Optional[str], typer.Option(help="Split (default: test).")] = None
    seqlen: Annotated[Optional[int], typer.Option(help="Window length in tokens (default: the config's eval.seqlen, else 2048).")] = None
    max_tokens: Annotated[Optional[int], typer.Option(help="Evaluate only the first windows covering this many tokens.")] = None
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward pass (default: the config's, else 1).")] = None
    bos: Annotated[Optional[str], typer.Option(help="auto, true or false: BOS first in every window (auto: where the tokenizer adds it); false is the papers' single token stream (default: the config's eval.bos, else auto).")] = None


@dataclass
class SpeedRuns:
    """eval-speed's measurements."""

    batch_sizes: Annotated[str, typer.Option(help="Comma-separated prefill batch sizes.")] = "1,16"
    seqlens: Annotated[str, typer.Option(help="Comma-separated prefill lengths in tokens; the shortest is also the decode prompt and the checked windows' length.")] = "512,2048"
    decode_tokens: Annotated[int, typer.Option(min=0, help="Tokens decoded one by one (batch 1, greedy, KV cache); 0: no decode timing.")] = 64
    check_windows: Annotated[int, typer.Option(min=1, help="Windows of random tokens whose logits must match the dense format's.")] = 4
    rtol: Annotated[float, typer.Option(min=0.0, help="Largest relative L2 difference of the sparse format's logits from the dense format's.")] = 0.05
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before each measurement.")] = 3
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (the median is reported).")] = 10


def grouped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Typer sees each field of a dataclass-typed parameter of ``fn`` as an option of its own, and ``fn`` gets the
    dataclass: options several commands share are declared once, and each command's signature stays short."""
    sig = inspect.signature(fn, eval_str=True)
    groups = {name: p.annotation for name, p in sig.parameters.items() if dataclasses.is_dataclass(p.annotation)}
    params = [p for name, p in sig.parameters.items() if name not in groups]
    owner: dict[str, str] = {}
    for name, cls in groups.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                            annotation=hints[f.name]))
            owner[f.name] = name

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values: dict[str, dict[str, Any]] = {name: {} for name in groups}
        for key in [k for k in kwargs if k in owner]:
            values[owner[key]][key] = kwargs.pop(key)
        return fn(*args, **kwargs, **{name: groups[name](**v) for name, v in values.items()})

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def _exit_codes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input: one line and exit 2. Any other failure: one line and exit 1 (STATPRUNE_DEBUG=1 for the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            print(f"statprune: error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get("STATPRUNE_DEBUG"):
                raise
            print(f"statprune: failed: {type(e).__name__}: {e}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _emit(report: Any, say: Output, render: Callable[[], None], result: bool = False) -> None:
    """Print the result once (under torchrun, only rank 0): JSON, or ``render``, which --quiet silences unless the
    printout is the command's ``result`` itself (a perplexity, an accuracy, the sizes written)."""
    from statprune_cli.distributed import is_main_process

    if not is_main_process():
        return
    if say.as_json:
        from statprune_cli.report import strict_json

        print(strict_json(report))
    elif result or not say.quiet:
        render()


def _version(value: bool) -> None:
    if value:
        print(f"statprune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """statprune: post-training pruning of LLMs with statistical correction."""


@app.command()
@_exit_codes
@grouped
def prune(
    config: Annotated[Path, typer.Argument(help="YAML config file (see configs/).")],
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (overrides output.dir).")] = None,
    overwrite: OverwriteOpt = False,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Statistics from `statprune calibrate`: prune with no forward pass (one-shot).")] = None,
    say: Output = Output(),
) -> None:
    """Load, calibrate layer by layer, prune, evaluate (if eval.datasets is set), and write the output folder.

    Example: statprune prune configs/smollm2-135m-statprune-50.yaml --set pruning.sparsity=0.6 -o out/sp60
    """
    from statprune_cli.config import load_config
    from statprune_cli.commands.prune import run_prune
    from statprune_cli.report import print_report

    cfg = load_config(config, list(set_ or []))
    if output is not None:
        cfg.output.dir = str(output)
    ui = say.ui()
    report = run_prune(cfg, overwrite=overwrite, stats_path=stats, ui=ui)
    _emit(report, say, lambda: print_report(report, ui.console))


@app.command()
@_exit_codes
@grouped
def calibrate(
    config: Annotated[Path, typer.Argument(help="YAML config file (model, calibration, pruning.targets/ignore and runtime are used).")],
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Statistics file to write (.safetensors); a .json summary goes beside it.")] = None,
    overwrite: OverwriteOpt = False,
    say: Output = Output(),
) -> None:
    """Run the calibration pass only and save per-linear channel statistics (count, sum, sum of squares, sum of |x|).

    Reuse them with `statprune prune CONFIG --stats FILE` to sweep sparsities in seconds.
    Example: statprune calibrate configs/smollm2-135m-statprune-50.yaml -o out/smollm2.stats.safetensors
    """
    from rich.table import Table

    from statprune_cli.config import load_config
    from statprune_cli.commands.calibrate import run_calibrate

    cfg = load_config(config, list(set_ or []))
    if output is None:
        if not cfg.output.dir:
            raise InputError("--output: required (or set output.dir, which gives OUTPUT_DIR.stats.safetensors)")
        output = Path(cfg.output.dir.rstrip("/") + ".stats.safetensors")
    ui = say.ui()
    summary = run_calibrate(cfg, output, overwrite=overwrite, ui=ui)

    def render() -> None:
        table = Table(title="largest-energy input channels")
        for col in ("linears", "tokens", "top channels", "share of energy", "max |mean|"):
            table.add_column(col)
        for row in summary["inputs"]:
            names = ",".join(n.rsplit(".", 1)[-1] for n in row["linears"])
            layer = row["linears"][0].rsplit(".", 2)[0].rsplit(".", 1)[-1]
            table.add_row(f"{layer}: {names}", str(row["tokens"]), str(row["top_channels"]), f"{row['top_share']:.1%}",
                          f"{row['max_abs_mean']:.3g}")
        ui.console.print(table)
        ui.console.print(f"statistics: {summary['stats_file']}; summary: {summary['summary_file']}", markup=False)

    _emit(summary, say, render)


@app.command()
@_exit_codes
@grouped
def sweep(
    config: Annotated[Path, typer.Argument(help="YAML config file: model, calibration, eval and runtime are shared by every cell.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods; a suffix +owl, +owl(m=7;lam=0.04), +realloc, +realloc(absorbed), +realloc(off), +lsa or +lsa(off) sets OWL, N:M channel reallocation or its LSA refinement for that row.")] = "magnitude,wanda,sparsegpt,ria,statprune",
    sparsities: Annotated[str, typer.Option(help="Comma-separated settings: 0.5 or 50% (unstructured), or N:M such as 2:4.")] = "0.5,0.6,0.7,2:4,4:8",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for sweep.json, sweep.md and sweep.png (default: output.dir + '-sweep').")] = None,
    zeroshot: Annotated[bool, typer.Option("--zeroshot", help="Also the mean zero-shot accuracy per cell (tasks from eval.zeroshot; needs statprune\\[eval]).")] = False,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    say: Output = Output(),
) -> None:
    """Every method at every sparsity on the same calibration windows and evaluation text: a table and a plot.

    pruning.options apply to the config's own method; the other methods run with their defaults.
    Example: statprune sweep configs/smollm2-135m-statprune-50.yaml --methods wanda,sparsegpt,statprune --sparsities 0.5,2:4 -o out/sweep
    """
    from statprune_cli.config import load_config
    from statprune_cli.commands.sweep import run_sweep

    cfg = load_config(config, list(set_ or []))
    if output is None:
        if not cfg.output.dir:
            raise InputError("--output: required (or set output.dir, which gives OUTPUT_DIR-sweep)")
        output = Path(cfg.output.dir.rstrip("/") + "-sweep")
    ui = say.ui()
    result = run_sweep(cfg, [m.strip() for m in methods.split(",") if m.strip()],
                       [s.strip() for s in sparsities.split(",") if s.strip()], output, overwrite=overwrite, ui=ui,
                       zeroshot=zeroshot)

    def render() -> None:
        from statprune_cli.sweep_grid import sweep_table

        ui.console.print(sweep_table(result), markup=False)
        plot = f", {result['plot']}" if result["plot"] else " (no plot: pip install 'statprune[plot]')"
        ui.console.print(f"wrote {result['output_dir']}: sweep.json, sweep.md{plot}", markup=False)

    _emit(result, say, render)


def _target_config(target: str, model: ModelChoice) -> Any:
    """The evaluation commands' config: a YAML file (with --set) or a model folder / hub id, then --device/--dtype."""
    from statprune_cli.config import Config, ModelConfig, load_config

    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, list(model.set_ or []))
    else:
        cfg = Config(model=ModelConfig(name_or_path=target, gguf_file=model.gguf_file))
    if model.device is not None:
        cfg.runtime.device = model.device
    if model.dtype is not None:
        cfg.model.dtype = model.dtype
    return cfg


@app.command("eval-ppl")
@_exit_codes
@grouped
def eval_ppl(
    target: Annotated[str, typer.Argument(help="A YAML config (evaluates its model.name_or_path with its eval section) or a model folder / hub id.")],
    data: PplData = PplData(),
    model: ModelChoice = ModelChoice(),
    say: Output = Output(),
) -> None:
    """Perplexity with the standard protocol: text joined with "\\n\\n", non-overlapping windows, exp(mean NLL).

    Where the model's tokenizer adds BOS, each window starts with it and it is never scored; --bos false gives the
    GPTQ / SparseGPT / Wanda protocol as published.

    Example: statprune eval-ppl out/smollm2-50 --dataset wikitext2 --data-files ../shared/data/wikitext-2-raw --seqlen 512
    """
    from statprune_cli.commands.eval_ppl import run_eval
    from statprune_cli.config import DataConfig, parse_yaml, validate
    from statprune_cli.lock import recover_if_idle
    from statprune_cli.schema import build

    cfg = _target_config(target, model)
    e = cfg.eval
    if data.dataset is not None or not e.datasets:
        e.datasets = [build(DataConfig, {"dataset": data.dataset or "wikitext2", "data_files": data.data_files,
                                         "split": data.split}, "--dataset")]
    for key in ("seqlen", "max_tokens", "batch_size"):
        if getattr(data, key) is not None:
            setattr(e, key, getattr(data, key))
    if data.bos is not None:
        e.bos = parse_yaml(data.bos, "--bos")
    validate(cfg)
    ui = say.ui()
    recover_if_idle(Path(cfg.model.name_or_path), ui.log)
    results = run_eval(cfg, ui)

    def render() -> None:
        for r in results:
            limit = f", max_tokens={r['max_tokens']}" if r["max_tokens"] else ""
            first = ", BOS first" if r["bos"] else ""
            print(f"{r['dataset']}: perplexity {r['perplexity']:.4f} (seqlen {r['seqlen']}, {r['windows']} windows{first}, "
                  f"{r['tokens']} tokens{limit}, {r['dtype']})")

    _emit(results, say, render, result=True)


@app.command("eval-zeroshot")
@_exit_codes
@grouped
def eval_zeroshot(
    target: Annotated[str, typer.Argument(help="A YAML config (evaluates its model.name_or_path with its eval.zeroshot section) or a model folder / hub id.")],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated: boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa (default: the config's eval.zeroshot.tasks, else the first seven).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N examples of each task.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Requests per forward pass (default: the config's, else 1).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Local task files (e.g. ../shared/data/zeroshot); no hub access. Default: eval.zeroshot.data_dir, else $STATPRUNE_ZEROSHOT_DATA, else the hub.")] = None,
    model: ModelChoice = ModelChoice(),
    say: Output = Output(),
) -> None:
    """Zero-shot accuracy (acc, acc_norm) with lm-evaluation-harness's stock 0-shot tasks; needs `pip install 'statprune\\[eval]'`.

    A folder written by `prune` also gets the result in its report.json.
    Example: statprune eval-zeroshot out/smollm2-50 --data-dir ../shared/data/zeroshot --tasks boolq,piqa --limit 100
    """
    from statprune_cli.commands.eval_zeroshot import run_zeroshot
    from statprune_cli.config import ZEROSHOT_DEFAULT, check_zeroshot_data_dir, check_zeroshot_tasks, validate
    from statprune_cli.lock import recover_if_idle
    from statprune_cli.report import print_zeroshot

    cfg = _target_config(target, model)
    z = cfg.eval.zeroshot
    if tasks is not None:
        z.tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        check_zeroshot_tasks(z.tasks, "--tasks")
    elif not z.tasks:
        z.tasks = list(ZEROSHOT_DEFAULT)
    if data_dir is not None:
        check_zeroshot_data_dir(data_dir, "--data-dir")
        z.data_dir = str(data_dir)
    for key, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None:
            setattr(z, key, value)
    validate(cfg)
    ui = say.ui()
    recover_if_idle(Path(cfg.model.name_or_path), ui.log)
    result = run_zeroshot(cfg, ui)
    _emit(result, say, lambda: print_zeroshot(result, ui.console), result=True)


@app.command()
@_exit_codes
@grouped
def export(
    pruned_dir: Annotated[Path, typer.Argument(help="A folder written by `statprune prune`.")],
    format: Annotated[str, typer.Option("--format", help="dense (Hugging Face folder) or bitmask (nonzero values + packed bit mask).")] = "bitmask",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to write (default: PRUNED_DIR-FORMAT beside it).")] = None,
    overwrite: OverwriteOpt = False,
    say: Output = Output(),
) -> None:
    """Write a pruned model as a dense Hugging Face folder or as a compressed bitmask folder, and report both sizes.

    Example: statprune export out/smollm2-50 --format bitmask -o out/smollm2-50-bitmask
    """
    from statprune_cli.commands.export import run_export

    result = run_export(pruned_dir, format, output, overwrite, say.ui())
    _emit(result, say, lambda: print(
        f"wrote {result['output']} ({format}): weights {result['output_bytes'] / 2**20:.1f} MiB, dense weights "
        f"{result['dense_bytes'] / 2**20:.1f} MiB ({result['output_bytes'] / max(result['dense_bytes'], 1):.0%})"),
        result=True)


@app.command("eval-speed")
@_exit_codes
@grouped
def eval_speed(
    pruned_dir: Annotated[Path, typer.Argument(help="A folder written by `statprune prune` with a 2:4 pattern.")],
    runs: SpeedRuns = SpeedRuns(),
    say: Output = Output(),
) -> None:
    """Prefill throughput and decode latency of a 2:4 model, dense format against PyTorch's semi-structured sparse one.

    Needs a CUDA GPU of compute capability 8.0 or newer; the model runs in bfloat16. Exits 1, after the report, when the sparse format's logits differ from the dense format's by more than --rtol.
    Example: statprune eval-speed out/smollm2-2of4 --batch-sizes 1,16 --seqlens 512,2048 --json
    """
    from statprune_cli import speed
    from statprune_cli.errors import PruneError

    settings = speed.SpeedSettings(speed.parse_sizes(runs.batch_sizes, "--batch-sizes"),
                                   speed.parse_sizes(runs.seqlens, "--seqlens"), runs.decode_tokens, runs.check_windows,
                                   runs.rtol, runs.warmup, runs.repeats)
    if problem := speed.device_problem():
        raise InputError(problem)
    if not pruned_dir.is_dir():
        raise InputError(f"PRUNED_DIR: {pruned_dir} is not a folder")
    ui = say.ui()
    report = speed.run_speed(pruned_dir, settings, ui)
    _emit(report, say, lambda: speed.print_speed(report, ui.console))
    if failure := speed.check_failure(report["check"]):
        raise PruneError(failure)


def main() -> None:
    app()
