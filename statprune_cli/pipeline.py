"""The pipeline, read top to bottom: config -> load -> data -> layer-wise engine -> method -> export -> report.

Every check that can fail on bad input runs before the weights load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from statprune_cli.allocation import energy_sparsities
from statprune_cli.config import Config, EvalConfig, dump_config, parse_size
from statprune_cli.data import batched, calibration_windows, load_documents, window_bos
from statprune_cli.distributed import Communicator, launched, launched_world_size
from statprune_cli.engine import Collect, EngineResult, Job, LayerDone, LayerIO, LayerwiseEngine, Resume, Selection
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.export import EXTRAS_NAME, atomic_dir, check_output_dir, save_model_folder, write_extras, write_json_atomic
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import check_against_model, check_seqlen, load_model, load_model_config, load_tokenizer, torch_dtype
from statprune_cli.methods import Method, Target, build_method
from statprune_cli.plan import Plan, make_plan
from statprune_cli.permute import RESIDUAL_ROWS, RESIDUAL_TOKENS, ResidualPlan, head_blocks, producers, residual_order, residual_plan
from statprune_cli.perplexity import EvalSet, evaluate_perplexity, load_eval_set
from statprune_cli.profile import outlier_ratio, owl_sparsities
from statprune_cli.report import layer_summary, model_sparsity, package_versions, peak_memory, strict_json
from statprune_cli.sketch import resolve_every
from statprune_cli.stats import ChannelStats, load_stats, save_stats
from statprune_cli.streaming import (Checkpoint, StreamedLayers, StreamingOutput, folder_sparsity, load_skeleton, partial_dir,
                                     resolve_folder, return_freed_memory_promptly, should_stream,
                                     tokenizer_folder, trim_heap)
from statprune_cli.ui import UI
from statprune_cli.zeroshot import check_tokenizer, evaluate_zeroshot, prepare_zeroshot


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


def calibration_batches(cfg: Config, tokenizer: Any, ui: UI) -> tuple[list[torch.Tensor], str]:
    c = cfg.calibration
    bos = window_bos(tokenizer, c.bos, "calibration.bos")
    c.bos = bos is not None  # auto settled: report.json's calibration section and statprune.yaml say what ran
    docs = load_documents(c, "calibration", default_split="train")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    windows, origin = calibration_windows(docs, tokenize, c.nsamples, c.seqlen, c.seed, log=ui.log, bos=bos)
    del docs
    trim_heap()  # tokenizing leaves tens of MB of freed heap that would count in the whole run's peak
    where = f" ({c.data_files})" if c.data_files else ""
    first = " (BOS first)" if c.bos else ""
    return batched(windows, c.batch_size), (f"{c.nsamples} windows x {c.seqlen} tokens{first} from {c.dataset}{where}, "
                                            f"seed {c.seed}, from {origin}")


def eval_sets(cfg: Config, tokenizer: Any) -> list[EvalSet]:
    e = cfg.eval
    sets = [load_eval_set(tokenizer, d, e.seqlen, e.max_tokens, key=f"eval.datasets[{i}]", bos=e.bos)
            for i, d in enumerate(e.datasets)]
    trim_heap()
    return sets


@dataclass
class Pruned:
    """What pruning a loaded model gives: the engine (still holding the model) and what it did."""

    engine: LayerwiseEngine
    result: EngineResult
    mode: str
    notes: list[str]
    layer_sparsity: list[float] | None
    from_shared_stats: bool = False  # used ``DenseStats`` collected for other runs too (a sweep's cells)
    residual_permuted: bool = False  # the residual stream was permuted (``residual_stream_order``)


def layer_target(base: float, owl: list[float] | None, index: int) -> float:
    """Decoder layer ``index``'s sparsity: OWL's where the profile gave one, else the run's (``base``)."""
    return base if owl is None else owl[index]


def config_method(cfg: Config) -> Method:
    """The method ``pruning`` asks for, its ``auto`` options settled by the pattern and sparsity."""
    p = cfg.pruning
    return build_method(p.method, p.options, p.pattern)


def selection(plan: Plan) -> Selection:
    return Selection(plan.targets, plan.ignore)


def collect_for(plan: Plan, matrices: bool = True) -> Collect:
    """What the plan's statistics passes gather (``matrices`` False: no Gram matrix or sketch, for OWL and the
    residual order, which read the channel statistics alone)."""
    return Collect(plan.skip_first_tokens, plan.gram and matrices, plan.sketch_rank if matrices else 0, plan.sketch_every)


def needs_batches(cfg: Config, method: Method) -> bool:
    """Calibration windows are read when the method needs statistics or OWL needs its outlier ratios."""
    return method.needs_calibration or cfg.pruning.profile == "owl"


def describe_mode(plan: Plan, method: Method, stats_path: Path | None) -> str:
    if stats_path is not None:
        return f"one-shot: masks from dense-model statistics in {stats_path}, no forward pass"
    if not method.needs_calibration:
        return "data-free: no calibration pass"
    inside = ("; inside each layer, each group of linears on the outputs of the groups already pruned (true sequential)"
              if plan.true_sequential else "")
    if plan.sequential:
        return "sequential: each layer is calibrated on the outputs of the already-pruned layers" + inside
    return "dense-activation: each layer is calibrated on the dense model's activations" + inside


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


class DenseStats:
    """Dense-model statistics, collected once per (what is collected, token budget) and reused: OWL's ratios, the
    residual order, the sweep's cells."""

    def __init__(self, selection: Selection, batches: list[torch.Tensor] | None, ui: UI) -> None:
        self.selection, self.batches, self.ui = selection, batches, ui
        self.cache: dict[tuple[Collect, int | None], dict[str, ChannelStats]] = {}
        self.seconds = 0.0  # spent collecting, so a sweep can keep it out of the cell that happens to ask first

    def get(self, engine: LayerwiseEngine, collect: Collect, tokens: int | None = None) -> dict[str, ChannelStats]:
        """Statistics over every window, or over the first windows that hold ``tokens`` tokens (enough for an
        estimate that needs no more: a pass costs in proportion to its tokens). Statistics already collected over
        more windows serve a smaller budget, and a Gram matrix serves any sketch."""
        batches = self.batches
        if tokens is not None and batches and tokens < sum(b.numel() for b in batches):
            batches = first_windows(batches, tokens)
        if collect.sketch:  # keyed by the stride the engine takes, so an explicit equal one is served
            collect = replace(collect, sketch_every=resolve_every(collect.sketch_every, batches))
        for (c, t), stats in sorted(self.cache.items(), key=lambda item: item[0][1] is not None):  # all windows first
            if c.skip_first == collect.skip_first and (c.gram or not collect.gram) and (
                    not collect.sketch or (c.sketch, c.sketch_every) == (collect.sketch, collect.sketch_every) or c.gram) and (
                    t is None or (tokens is not None and t >= tokens)):
                return stats
        self.ui.log("one dense calibration pass" + (" with input Hessians" if collect.gram else "")
                    + (f" with {collect.sketch}-probe sketches" if collect.sketch else "")
                    + (f" over {sum(len(b) for b in batches)} of {sum(len(b) for b in self.batches)} windows"
                       if batches is not self.batches else ""))
        t0 = time.perf_counter()
        stats = engine.statistics(batches, self.selection, collect)
        self.seconds += time.perf_counter() - t0
        self.cache[(collect, None if batches is self.batches else tokens)] = stats
        return stats


def first_windows(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first whole windows of ``batches`` (each a batch of windows) that hold ``tokens`` tokens, the last batch
    cut short where it holds more than needed."""
    out, held = [], 0
    for batch in batches:
        take = min(len(batch), -(-(tokens - held) // batch.shape[-1]))
        out.append(batch[:take])
        held += out[-1].numel()
        if held >= tokens:
            break
    return out


@dataclass
class PruneInputs:
    """What a prune reads besides the model: the config (runtime settings), its plan and method, the calibration
    batches, and statistics from a ``--stats`` file (one-shot) if given."""

    cfg: Config
    plan: Plan
    method: Method
    batches: list[torch.Tensor] | None
    stats: dict[str, ChannelStats] | None = None
    stats_path: Path | None = None


class LinearTargets:
    """The engine's ``TargetRule``: each linear's target from the plan, OWL's layer profile, the energy allocation
    (on the group's statistics, known only once the engine has them) and what the architecture can absorb."""

    def __init__(self, plan: Plan, model: torch.nn.Module, layer_sparsity: list[float] | None) -> None:
        self.plan, self.model, self.layer_sparsity, self.base = plan, model, layer_sparsity, plan.target()

    def __call__(self, index: int, linears: dict[str, torch.nn.Linear],
                 stats: dict[str, ChannelStats]) -> dict[str, Target]:
        sparsity = self.base.sparsity if self.layer_sparsity is None else self.layer_sparsity[index]
        if self.plan.allocation == "uniform":
            return {name: self.one(name, sparsity) for name in linears}
        sparsities = energy_sparsities(linears, stats, sparsity, self.plan.allocation_spread)
        return {name: self.one(name, s) for name, s in sparsities.items()}

    def one(self, name: str, sparsity: float) -> Target:
        t = self.base
        if not t.reallocation or self.plan.reallocation is True or producers(self.model, name) is not None:
            return replace(t, name=name, sparsity=sparsity)
        blocks = head_blocks(self.model, name)  # absorbed: an attention's output projection reorders within heads
        absorbable = blocks is not None and t.nm is not None and blocks[0] % t.nm[1] == 0
        return replace(t, name=name, sparsity=sparsity, reallocation=absorbable, blocks=blocks if absorbable else None)


def prune_model(inputs: PruneInputs, model: torch.nn.Module, device: torch.device, ui: UI,
                placement: Placement | None = None, dense: DenseStats | None = None, shared: bool = False) -> Pruned:
    """Prune a loaded model in place, layer by layer: the pre-passes (shared dense statistics, OWL's profile, the
    residual order) first, then the engine.

    ``dense`` holds dense-model statistics, collected once: OWL's ratios come from them, and a run calibrated on
    the dense model's activations prunes from them with no pass of its own (what it would compute anyway) when
    OWL already made them or ``shared`` says other runs use them too (a sweep's cells).
    ``placement`` says where layers and activations live, and what happens after each layer.
    """
    plan, method, stats = inputs.plan, inputs.method, inputs.stats
    placement = placement or Placement()
    engine = placement.engine(model, device, inputs.cfg, ui)
    dense = dense or DenseStats(selection(plan), inputs.batches, ui)
    mode = describe_mode(plan, method, inputs.stats_path)
    notes: list[str] = []
    used_dense = False  # statistics from ``dense``: for the masks, or for OWL's ratios or the residual order
    dense_only = not (plan.sequential or plan.true_sequential)
    if stats is None and method.needs_calibration and dense_only and (shared or plan.profile == "owl"):
        stats, used_dense = dense.get(engine, collect_for(plan)), True
        mode += " (dense statistics collected once, " + ("shared by the sweep's cells)" if shared else "for OWL and the masks)")
    layer_sparsity = None
    if plan.profile == "owl":
        used_dense = used_dense or stats is None
        layer_sparsity = owl_profile(engine, plan, stats if stats is not None else dense.get(engine, collect_for(plan, False)))
        notes.append(f"OWL layer sparsities (M {plan.owl_m:g}, lambda {plan.owl_lam:g}): "
                     + ", ".join(f"{s:.3f}" for s in layer_sparsity))
    residual_permuted = False
    if plan.residual_permutation:
        used_dense = used_dense or stats is None
        stats, note, residual_permuted = permute_residual(engine, plan, stats, dense)
        notes.append(note)
    job = Job(method, LinearTargets(plan, engine.model, layer_sparsity), selection(plan), collect_for(plan),
              plan.sequential, plan.true_sequential, stats)
    result = engine.run(job, inputs.batches, placement.resume, placement.on_layer_done)
    if plan.reallocation == "absorbed" and not any(r.reordered for layer in result.layers for r in layer.linears.values()):
        notes.append("reallocation absorbed: no MLP down projection or attention output projection of this architecture "
                     "can take a permutation of its inputs (fused or normalised in between), so every linear kept the "
                     "stored channel order")
    return Pruned(engine, result, mode, notes, layer_sparsity, shared and used_dense, residual_permuted)


def owl_profile(engine: LayerwiseEngine, plan: Plan, stats: dict[str, ChannelStats]) -> list[float]:
    """OWL's sparsity per decoder layer, from each layer's share of outlier scores."""
    ratios = [outlier_ratio(engine.linears(i, selection(plan)), stats, plan.owl_m) for i in range(len(engine.layers))]
    return owl_sparsities(ratios, plan.sparsity, plan.owl_lam)


def permute_residual(engine: LayerwiseEngine, plan: Plan, stats: dict[str, ChannelStats] | None,
                     dense: DenseStats) -> tuple[dict[str, ChannelStats] | None, str, bool]:
    """Permute the residual stream for its readers' N:M groups, where the architecture allows: (the statistics in
    the new order, the report's note, whether it was permuted)."""
    model = engine.model
    residual = residual_plan(model, engine.layers_name, model.config.hidden_size)
    if isinstance(residual, str):
        return stats, f"residual stream kept in its stored order ({residual})", False
    t0 = time.perf_counter()
    base = stats if stats is not None else dense.get(engine, collect_for(plan, False), RESIDUAL_TOKENS)
    t1 = time.perf_counter()
    order, note = residual_stream_order(engine, residual, base, plan.target())
    t2 = time.perf_counter()
    engine.io.permute_residual(model, residual, order)
    # the step's cost in parts, so a user can weigh it against its gain (``residual_permutation: false``)
    note += (f"; {t1 - t0:.1f} s for the statistics (a dense pass unless shared), {t2 - t1:.1f} s choosing the order, "
             f"{time.perf_counter() - t2:.1f} s permuting the weights")
    if stats is not None:  # copies: the statistics may be shared (a sweep's dense ones)
        readers = {n for names in residual.reader_names(engine.layers_name, len(engine.layers)).values() for n in names}
        stats = {k: s.permuted(order) if k in readers else s for k, s in stats.items()}
    return stats, note, True


def residual_stream_order(engine: LayerwiseEngine, plan: ResidualPlan, stats: dict[str, ChannelStats],
                          target: Target, rows: int = RESIDUAL_ROWS) -> tuple[torch.Tensor, str]:
    """One order of the residual stream for every pruned reader's N:M groups, chosen on their Wanda scores (the one
    score all methods' statistics allow), and the report's note on it."""
    assert target.nm is not None  # validate_reordering: N:M only
    pruned = {i: [n for n in names if n in stats]
              for i, names in plan.reader_names(engine.layers_name, len(engine.layers)).items()}
    total = sum(engine.model.get_submodule(n).out_features for names in pruned.values() for n in names)

    def scores() -> Iterator[torch.Tensor]:
        for i, names in pruned.items():
            if names:
                with engine.layer(i):
                    for n in names:
                        yield stats[n].wanda_score(engine.model.get_submodule(n).weight.detach())

    order, sampled, gain = residual_order(scores(), total, *target.nm, target.lsa, rows)
    how = "heuristic order refined by LSA" if target.lsa else "heuristic order"
    tokens = next(stats[n].count for names in pruned.values() for n in names)
    return order, (f"residual stream permuted for N:M ({len(order)} channels, {how}, on {sampled} of {total} reader "
                   f"rows' Wanda scores over {tokens} calibration tokens): kept score {gain:+.3%} against the stored "
                   "order")


def perplexities(cfg: Config, engine: LayerwiseEngine, evals: list[EvalSet], ui: UI) -> list[dict[str, Any]]:
    out = []
    for es in evals:
        ui.log(f"evaluating perplexity on {es.name}")
        out.append(evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict())
    return out


def check_stats(stats_path: Path, shapes: dict[str, tuple[int, int]], cfg: Config,
                method: Method) -> tuple[dict[str, ChannelStats], int | None]:
    """Load a ``--stats`` file and check it covers every target linear with what the method needs; returns the
    statistics and the positions they leave out.

    Those positions (the calibrate run's choice) cannot be recomputed without data. A config that sets another
    ``calibration.skip_first_tokens`` is refused; one that leaves it unset takes the file's (``make_plan``).
    """
    stats, skip = load_stats(stats_path)
    for name, (_, cols) in shapes.items():
        if name not in stats or stats[name].sum.numel() != cols:
            raise InputError(f"--stats: {stats_path} has no statistics of {cols} channels for {name}")
        if method.needs_gram and stats[name].gram is None:
            raise InputError(f"--stats: {stats_path} has no input Hessian for {name}; {method.name} needs one "
                             f"(run `statprune calibrate` with pruning.method: {method.name})")
        if method.sketch_rank and stats[name].probed(method.sketch_rank) is None:
            raise InputError(f"--stats: {stats_path} has no {method.sketch_rank}-probe sketch of the input Hessian for "
                             f"{name}; statprune's sketched update needs one (run `statprune calibrate` with the same config)")
    wanted = cfg.calibration.skip_first_tokens
    if skip is not None and wanted is not None and wanted != skip:
        raise InputError(f"--stats: {stats_path} leaves out the first {skip} position(s) of each window, "
                         f"calibration.skip_first_tokens asks for {wanted}; run `statprune calibrate` with {wanted} or drop the key")
    return stats, skip


def run_prune(cfg: Config, overwrite: bool = False, stats_path: Path | None = None, ui: UI | None = None) -> dict[str, Any]:
    """Prune the model of ``cfg`` and write the output folder; returns the report."""
    ui = ui or UI()
    if not cfg.output.dir:
        raise ConfigError("output.dir", "required: where to write the pruned model (or pass --output)")
    out = Path(cfg.output.dir)
    check_output_dir(out, overwrite)
    device = setup_runtime(cfg)
    timer = Timer()
    method = config_method(cfg)
    streaming = decide_streaming(cfg)

    with timer.phase("prepare"):
        model_config = load_model_config(cfg.model)
        shapes = check_against_model(cfg, model_config)
        stats, skip = check_stats(stats_path, shapes, cfg, method) if stats_path else (None, None)
        plan = make_plan(cfg, method, skip)
        checkpoint = Checkpoint(resolve_folder(cfg.model)) if streaming else None
        tokenizer = load_tokenizer(cfg.model)
        batches, calibration = None, "none (the method needs no data)"
        if stats is not None:
            calibration = f"statistics from {stats_path}"
        elif needs_batches(cfg, method):
            batches, calibration = calibration_batches(cfg, tokenizer, ui)
        evals = eval_sets(cfg, tokenizer)
        if cfg.eval.zeroshot.tasks:
            if streaming:
                raise ConfigError("eval.zeroshot", "zero-shot evaluation puts the whole model on the device, which a "
                                                   "streaming run avoids; run `statprune eval-zeroshot` on the output instead")
            prepare_zeroshot(cfg.eval.zeroshot)
            check_tokenizer(tokenizer, cfg.model.name_or_path)
    check_world(cfg, batches)
    with launched(device, cfg.runtime.dist_timeout_minutes) as (comm, device):
        run = Run(PruneInputs(cfg, plan, method, batches, stats, stats_path), evals, device, ui, timer, comm)
        if checkpoint is None:
            return prune_in_memory(run, out, overwrite, tokenizer, calibration)
        with tokenizer_folder(out, comm.suffix) as tokenizer_dir:
            tokenizer.save_pretrained(tokenizer_dir)
            del tokenizer  # only its files go on; the layers to come want its memory back (24 MiB measured)
            trim_heap()
            return prune_streamed(run, out, checkpoint, model_config, Path(tokenizer_dir), calibration)


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


def prune_in_memory(run: Run, out: Path, overwrite: bool, tokenizer: Any, calibration: str) -> dict[str, Any]:
    """The whole model in CPU memory, one layer on the device; rank 0 writes the folder at the end."""
    cfg, timer = run.inputs.cfg, run.timer
    with timer.phase("load"):
        run.ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
        model = load_model(cfg.model)
    with activation_folder(cfg, out) as acts:
        pruned, ppl = run.prune_and_evaluate(model, Placement(activation_dir=acts, comm=run.comm))
    zeroshot = None
    if cfg.eval.zeroshot.tasks and run.comm.is_main:
        with timer.phase("zeroshot"):
            zeroshot = evaluate_zeroshot(model.to(run.device), tokenizer, cfg.eval.zeroshot, run.ui).to_dict()
    model.to("cpu")
    report = run.report(pruned, ppl, calibration, model_sparsity(model), out)
    report["zeroshot"] = zeroshot
    if run.comm.is_main:
        with timer.phase("save"):
            with atomic_dir(out, overwrite) as tmp:
                save_model_folder(tmp, model, tokenizer, parse_size(cfg.output.shard_size, "output.shard_size"))
                extras = {k: t for layer in pruned.result.layers for k, t in layer.extras().items()}
                if extras:
                    write_extras(tmp, extras)
                run.write_run_files(tmp, report)
        report["timings"]["save"] = round(timer.phases["save"], 3)
    run.comm.barrier()  # the other processes end when the folder is complete
    return report


def prune_streamed(run: Run, out: Path, checkpoint: Checkpoint, model_config: Any, tokenizer_dir: Path,
                   calibration: str) -> dict[str, Any]:
    """Layers read from the checkpoint and written to ``.NAME.partial`` as they finish (by rank 0), resumable."""
    cfg, timer, comm = run.inputs.cfg, run.timer, run.comm
    with partial_dir(out, rename=comm.is_main) as partial:
        with timer.phase("load"):
            run.ui.log(f"streaming {cfg.model.name_or_path} ({cfg.model.dtype}): one decoder layer in memory at a time")
            model = load_skeleton(cfg.model, model_config, checkpoint)
        layers_name, layers = find_decoder_layers(model)
        output = StreamingOutput(partial, checkpoint, layers_name, len(layers),
                                 {**cfg.to_dict(), "plan": run.inputs.plan.to_dict()}, comm, run.inputs.batches)
        state = output.resume()
        placement = Placement(StreamedLayers(checkpoint, layers_name, torch_dtype(cfg.model.dtype)), partial,
                              None if state is None else Resume(*state), output.layer_done, comm)
        pruned, ppl = run.prune_and_evaluate(model, placement, lambda: output.finish_weights(model, placement.io))
        report = run.report(pruned, ppl, calibration, None, out)
        comm.barrier()  # every process is done with its activations before rank 0 clears them
        if comm.is_main:
            with timer.phase("save"):
                model.config.save_pretrained(partial)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(partial)
                for f in tokenizer_dir.iterdir():
                    shutil.copy2(f, partial / f.name)
                report["sparsity"]["all_parameters"] = folder_sparsity(Checkpoint(partial, "output.dir"))
                output.progress.clear()
                for acts in partial.glob("activations-*"):
                    shutil.rmtree(acts)
                run.write_run_files(partial, report)
    if comm.is_main:
        report["timings"]["save"] = round(timer.phases["save"], 3)
    comm.barrier()
    return report


@contextmanager
def activation_folder(cfg: Config, out: Path) -> Iterator[Path | None]:
    """A temporary folder beside the output for ``offload_activations: disk`` (None otherwise)."""
    if cfg.runtime.offload_activations != "disk":
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.activations-", dir=out.parent) as folder:
        yield Path(folder)


@dataclass
class Run:
    """One prune's inputs, shared by the in-memory and the streaming paths of ``run_prune``."""

    inputs: PruneInputs
    evals: list[EvalSet]
    device: torch.device
    ui: UI
    timer: Timer
    comm: Communicator

    def prune_and_evaluate(self, model: torch.nn.Module, placement: Placement,
                           weights_written: Callable[[], Checkpoint] | None = None) -> tuple[Pruned, list[dict[str, Any]]]:
        """Prune, then evaluate; streaming evaluates from the written output (``weights_written()`` gives it)."""
        with self.timer.phase("prune"):
            pruned = prune_model(self.inputs, model, self.device, self.ui, placement)
        engine, cfg = pruned.engine, self.inputs.cfg
        if weights_written is not None:
            written = weights_written()
            eval_io = StreamedLayers(written, engine.layers_name, torch_dtype(cfg.model.dtype))
            engine = Placement(eval_io, placement.activation_dir, comm=self.comm).engine(model, self.device, cfg, self.ui)
        with self.timer.phase("eval"):
            ppl = perplexities(cfg, engine, self.evals, self.ui)
        return pruned, ppl

    def report(self, pruned: Pruned, ppl: list[dict[str, Any]], calibration: str, all_params: dict[str, Any] | None,
               out: Path) -> dict[str, Any]:
        cfg, plan = self.inputs.cfg, self.inputs.plan
        rows, totals = layer_summary(pruned.result, lambda i: layer_target(plan.sparsity, pruned.layer_sparsity, i))
        versions = package_versions()
        return {
            "statprune_version": versions["statprune"],
            "model": cfg.model.name_or_path,
            "method": plan.method,
            "plan": plan.to_dict(),
            "options": plan.options,
            "pattern": plan.pattern,
            "pattern_label": pattern_label(plan, pruned.residual_permuted),
            "reallocation": plan.reallocation,
            "lsa": plan.lsa,
            "residual_permutation": pruned.residual_permuted,
            "target_sparsity": plan.sparsity,
            "profile": plan.profile,
            "layer_target_sparsity": pruned.layer_sparsity,
            "allocation": plan.allocation,
            "mode": pruned.mode,
            "streaming": isinstance(pruned.engine.io, StreamedLayers),
            "calibration": {**asdict(cfg.calibration), "description": calibration,
                            "statistics_skip_first_tokens": plan.skip_first_tokens},
            "device": str(self.device),
            "world_size": self.comm.world_size,
            "sparsity": {"pruned_linears": totals, "all_parameters": all_params},
            "layers": rows,
            "perplexity": ppl,
            "timings": {},
            "memory": {},
            "notes": pruned.notes,
            "versions": versions,
            "output_dir": str(out),
        }

    def write_run_files(self, folder: Path, report: dict[str, Any]) -> None:
        """statprune.yaml (re-running it repeats the run) and report.json, with the final timings and memory."""
        (folder / "statprune.yaml").write_text(dump_config(self.inputs.plan.written_into(self.inputs.cfg)))
        report["timings"] = {k: round(v, 3) for k, v in self.timer.phases.items()}
        report["memory"] = peak_memory()
        report["extras_file"] = EXTRAS_NAME if (folder / EXTRAS_NAME).is_file() else None
        (folder / "report.json").write_text(strict_json(report))


def pattern_label(plan: Plan, residual: bool = False) -> str:
    if plan.nm:
        where = {True: ", channel reallocation", "absorbed": ", channel reallocation where absorbed"}
        orders = where.get(plan.reallocation, "") + (", residual stream permuted" if residual else "")
        return plan.pattern + orders + (" (LSA-refined)" if orders and plan.lsa else "")
    owl = ", OWL layer profile" if plan.profile == "owl" else ""
    return f"{plan.sparsity:.0%} unstructured (per {plan.granularity}{owl})"


def run_calibrate(cfg: Config, output: Path, overwrite: bool = False, ui: UI | None = None) -> dict[str, Any]:
    """One dense calibration pass; writes the per-linear statistics and a summary next to them."""
    ui = ui or UI()
    if output.exists() and not overwrite:
        raise InputError(f"--output: {output} already exists; pass --overwrite to replace it")
    device = setup_runtime(cfg)
    check_against_model(cfg, load_model_config(cfg.model))
    streaming = decide_streaming(cfg)
    tokenizer = load_tokenizer(cfg.model)
    batches, calibration = calibration_batches(cfg, tokenizer, ui)
    check_world(cfg, batches)
    t0 = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg)
    skip = plan.skip_first_tokens
    with reading_engine(cfg, device, streaming, output, ui) as engine:
        stats = engine.statistics(batches, selection(plan), collect_for(plan))
    summary = {"stats_file": str(output), "model": cfg.model.name_or_path, "calibration": calibration,
               "skip_first_tokens": skip, "world_size": engine.comm.world_size,
               "seconds": round(time.perf_counter() - t0, 3), "inputs": summarize_stats(stats)}
    if not engine.comm.is_main:  # every process holds the same statistics; rank 0 writes them
        return summary
    save_stats(stats, output, {"model": cfg.model.name_or_path, "calibration": calibration,
                                      "skip_first_tokens": str(skip)})
    summary_path = output.with_suffix(".json")
    write_json_atomic(summary_path, summary)
    summary["summary_file"] = str(summary_path)
    return summary


def summarize_stats(stats: dict[str, ChannelStats], top: int = 5) -> list[dict[str, Any]]:
    """Per distinct linear input (q/k/v share one): the channels with the largest energy and their share."""
    rows: list[dict[str, Any]] = []
    for name, s in stats.items():
        if rows and rows[-1]["_sumsq"] is not None and torch.equal(rows[-1]["_sumsq"], s.sumsq):
            rows[-1]["linears"].append(name)
            continue
        energy = s.sumsq
        values, idx = torch.topk(energy, min(top, energy.numel()))
        rows.append({"linears": [name], "tokens": s.count, "top_channels": idx.tolist(),
                     "top_share": float(values.sum() / energy.sum()) if energy.sum() > 0 else 0.0,
                     "max_abs_mean": float(s.mean.abs().max()), "_sumsq": s.sumsq})
    for r in rows:
        del r["_sumsq"]
    return rows


def run_eval(cfg: Config, ui: UI | None = None) -> list[dict[str, Any]]:
    """Perplexity of ``cfg.model`` on every data set of ``cfg.eval``."""
    ui = ui or UI()
    device = setup_runtime(cfg)
    config = load_model_config(cfg.model)
    check_seqlen("eval.seqlen", cfg.eval.seqlen, EvalConfig.seqlen, config, how="--seqlen or eval.seqlen")
    streaming = decide_streaming(cfg)
    tokenizer = load_tokenizer(cfg.model)
    sets = eval_sets(cfg, tokenizer)
    with reading_engine(cfg, device, streaming, None, ui) as engine:
        return [evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict() for es in sets]


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


def run_zeroshot(cfg: Config, ui: UI | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``cfg.model`` on the tasks of ``cfg.eval.zeroshot``; the whole model sits on the device.

    A folder written by ``prune`` also gets the result in its report.json, under ``zeroshot``.
    """
    ui = ui or UI()
    device = setup_runtime(cfg)
    prepare_zeroshot(cfg.eval.zeroshot)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer(tokenizer, cfg.model.name_or_path)
    ui.log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype})")
    model = load_model(cfg.model).to(device)
    result = evaluate_zeroshot(model, tokenizer, cfg.eval.zeroshot, ui).to_dict()
    report_path = Path(cfg.model.name_or_path) / "report.json"
    if report_path.is_file():
        write_json_atomic(report_path, {**json.loads(report_path.read_text()), "zeroshot": result})
        ui.log(f"zero-shot result added to {report_path}")
    return {"model": cfg.model.name_or_path, "dtype": cfg.model.dtype, "device": str(device), **result}
