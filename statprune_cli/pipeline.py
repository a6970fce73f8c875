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

from statprune_cli import __version__
from statprune_cli.allocation import energy_sparsities
from statprune_cli.config import (Config, EvalConfig, allocation_mode, dump_config, lsa_mode, parse_pattern, parse_size,
                                  reallocation_mode, residual_mode)
from statprune_cli.data import batched, calibration_windows, load_documents
from statprune_cli.distributed import Communicator, launched, launched_world_size
from statprune_cli.engine import EngineResult, LayerDone, LayerIO, LayerwiseEngine, Resume
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.export import EXTRAS_NAME, atomic_dir, check_output_dir, save_model_folder, write_extras, write_json_atomic
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import check_against_model, check_seqlen, enable_biases, load_model, load_model_config, load_tokenizer, torch_dtype
from statprune_cli.methods import Method, Target, build_method
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


def statistics_skip(cfg: Config, method: Method) -> int:
    """Positions left out of the statistics: the config's value if set, else the method's own choice."""
    skip = cfg.calibration.skip_first_tokens
    return method.skip_first_tokens if skip is None else skip


def calibrated_sequentially(cfg: Config, method: Method) -> bool:
    """Whether each layer's statistics come from the pruned layers' outputs: the config's value if set, else the method's."""
    s = cfg.pruning.sequential
    return method.sequential if s is None else s


def calibration_batches(cfg: Config, tokenizer: Any, ui: UI) -> tuple[list[torch.Tensor], str]:
    c = cfg.calibration
    docs = load_documents(c, "calibration", default_split="train")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    windows, origin = calibration_windows(docs, tokenize, c.nsamples, c.seqlen, c.seed, log=ui.log)
    del docs
    trim_heap()  # tokenizing leaves tens of MB of freed heap that would count in the whole run's peak
    where = f" ({c.data_files})" if c.data_files else ""
    return batched(windows, c.batch_size), f"{c.nsamples} windows x {c.seqlen} tokens from {c.dataset}{where}, seed {c.seed}, from {origin}"


def eval_sets(cfg: Config, tokenizer: Any) -> list[EvalSet]:
    e = cfg.eval
    sets = [load_eval_set(tokenizer, d, e.seqlen, e.max_tokens, key=f"eval.datasets[{i}]") for i, d in enumerate(e.datasets)]
    trim_heap()
    return sets


@dataclass
class Pruned:
    """What pruning a loaded model gives: the engine (still holding the model) and what it did."""

    engine: LayerwiseEngine
    result: EngineResult
    mode: str
    notes: list[str]
    skip: int
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


def resolved_choices(cfg: Config, method: Method) -> dict[str, Any]:
    """What the config leaves to the method and the code's defaults: a resumed run must get the same, or its layers
    would be pruned two ways (e.g. a partial run whose statprune version had another 2:4 reallocation default)."""
    return {"statprune_version": __version__, "options": asdict(method.options),
            "reallocation": reallocation_mode(cfg.pruning, method), "lsa": lsa_mode(cfg.pruning, method),
            "residual_permutation": residual_mode(cfg.pruning, method),
            "allocation": allocation_mode(cfg.pruning, method),
            "sequential": calibrated_sequentially(cfg, method), "skip_first_tokens": statistics_skip(cfg, method)}


def base_target(cfg: Config, method: Method) -> Target:
    p = cfg.pruning
    nm = parse_pattern(p.pattern)
    granularity = p.granularity or (p.profile == "owl" and method.owl_granularity) or method.granularity
    return Target(p.sparsity if nm is None else nm[0] / nm[1], nm, granularity,
                  reallocation=bool(reallocation_mode(cfg.pruning, method)), lsa=lsa_mode(cfg.pruning, method))


def needs_batches(cfg: Config, method: Method) -> bool:
    """Calibration windows are read when the method needs statistics or OWL needs its outlier ratios."""
    return method.needs_calibration or cfg.pruning.profile == "owl"


def describe_mode(cfg: Config, method: Method, stats_path: Path | None) -> str:
    if stats_path is not None:
        return f"one-shot: masks from dense-model statistics in {stats_path}, no forward pass"
    if not method.needs_calibration:
        return "data-free: no calibration pass"
    inside = ("; inside each layer, each group of linears on the outputs of the groups already pruned (true sequential)"
              if cfg.pruning.true_sequential else "")
    if calibrated_sequentially(cfg, method):
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
    """Dense-model statistics, collected once per (skip, gram, sketch and its stride, token budget) and reused: OWL's
    ratios, the residual order, the sweep's cells."""

    def __init__(self, cfg: Config, batches: list[torch.Tensor] | None, ui: UI) -> None:
        self.cfg, self.batches, self.ui = cfg, batches, ui
        self.cache: dict[tuple[int, bool, tuple[int, int | None], int | None], dict[str, ChannelStats]] = {}
        self.seconds = 0.0  # spent collecting, so a sweep can keep it out of the cell that happens to ask first

    def get(self, engine: LayerwiseEngine, skip: int, gram: bool, tokens: int | None = None,
            sketch: int = 0, sketch_every: int | None = None) -> dict[str, ChannelStats]:
        """Statistics over every window, or over the first windows that hold ``tokens`` tokens (enough for an
        estimate that needs no more: a pass costs in proportion to its tokens). Statistics already collected over
        more windows serve a smaller budget."""
        batches = self.batches
        if tokens is not None and batches and tokens < sum(b.numel() for b in batches):
            batches = first_windows(batches, tokens)
        if sketch:  # keyed by the stride the engine takes, so an explicit equal one is served
            sketch_every = resolve_every(sketch_every, batches)
        for (s, g, k, t), stats in sorted(self.cache.items(), key=lambda item: item[0][3] is not None):  # all windows first
            # a Gram matrix makes any sketch
            if s == skip and (g or not gram) and (not sketch or k == (sketch, sketch_every) or g) and (
                    t is None or (tokens is not None and t >= tokens)):
                return stats
        self.ui.log("one dense calibration pass" + (" with input Hessians" if gram else "") + (f" with {sketch}-probe sketches" if sketch else "")
                    + (f" over {sum(len(b) for b in batches)} of {sum(len(b) for b in self.batches)} windows"
                       if batches is not self.batches else ""))
        p = self.cfg.pruning
        t0 = time.perf_counter()
        stats = engine.run(None, None, p.targets, p.ignore, batches, skip_first=skip, gram=gram, sketch=sketch,
                           sketch_every=sketch_every).stats
        self.seconds += time.perf_counter() - t0
        self.cache[(skip, gram, (sketch, sketch_every), None if batches is self.batches else tokens)] = stats
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


def prune_model(
    cfg: Config, model: torch.nn.Module, method: Method, linear_names: list[str], batches: list[torch.Tensor] | None,
    stats: dict[str, ChannelStats] | None, device: torch.device, ui: UI, stats_path: Path | None = None,
    dense: DenseStats | None = None, shared: bool = False, placement: Placement | None = None,
) -> Pruned:
    """Prune a loaded model in place, layer by layer.

    ``dense`` holds dense-model statistics, collected once: OWL's ratios come from them, and a run calibrated on
    the dense model's activations prunes from them with no pass of its own (what it would compute anyway) when
    OWL already made them or ``shared`` says other runs use them too (a sweep's cells).
    ``placement`` says where layers and activations live, and what happens after each layer.
    """
    placement = placement or Placement()
    p = cfg.pruning
    skip = statistics_skip(cfg, method)
    notes = []
    bias_flags = enable_biases(model, linear_names, cfg.model.trust_remote_code) if method.wants_bias else []
    if bias_flags:
        notes.append(f"set {', '.join(bias_flags)} in config.json: the compensation writes biases")
    target = base_target(cfg, method)
    engine = placement.engine(model, device, cfg, ui)
    dense = dense or DenseStats(cfg, batches, ui)
    mode = describe_mode(cfg, method, stats_path)
    sequential = calibrated_sequentially(cfg, method)
    dense_only = not (sequential or p.true_sequential or method.needs_output_pass)
    used_dense = False  # statistics from ``dense``: for the masks, or for OWL's ratios
    if stats is None and method.needs_calibration and dense_only and (shared or p.profile == "owl"):
        stats, used_dense = dense.get(engine, skip, method.needs_gram, sketch=method.sketch_rank,
                                     sketch_every=method.sketch_every), True
        mode += " (dense statistics collected once, " + ("shared by the sweep's cells)" if shared else "for OWL and the masks)")
    layer_sparsity = None
    if p.profile == "owl":
        base = stats if stats is not None else dense.get(engine, skip, False)
        used_dense = used_dense or stats is None
        m = p.owl.m if p.owl.m is not None else method.owl_m
        ratios = [outlier_ratio(engine.linears(i, p.targets, p.ignore), base, m) for i in range(len(engine.layers))]
        layer_sparsity = owl_sparsities(ratios, target.sparsity, p.owl.lam)
        notes.append(f"OWL layer sparsities (M {m:g}, lambda {p.owl.lam:g}): " + ", ".join(f"{s:.3f}" for s in layer_sparsity))

    residual_permuted = False
    if residual_mode(p, method):
        plan = residual_plan(model, engine.layers_name, model.config.hidden_size)
        if isinstance(plan, str):
            notes.append(f"residual stream kept in its stored order ({plan})")
        else:
            t0 = time.perf_counter()
            base = stats if stats is not None else dense.get(engine, skip, False, RESIDUAL_TOKENS)
            used_dense = used_dense or stats is None
            t1 = time.perf_counter()
            order, note = residual_stream_order(engine, plan, base, target)
            t2 = time.perf_counter()
            engine.io.permute_residual(model, plan, order)
            residual_permuted = True
            # the step's cost in parts, so a user can weigh it against its gain (``residual_permutation: false``)
            notes.append(f"{note}; {t1 - t0:.1f} s for the statistics (a dense pass unless shared), {t2 - t1:.1f} s "
                         f"choosing the order, {time.perf_counter() - t2:.1f} s permuting the weights")
            if stats is not None:  # copies: the statistics may be shared (a sweep's dense ones)
                by_layer = plan.reader_names(engine.layers_name, len(engine.layers)).values()
                readers = {n for names in by_layer for n in names}
                stats = {k: s.permuted(order) if k in readers else s for k, s in stats.items()}
    realloc_mode = reallocation_mode(cfg.pruning, method)

    allocation = allocation_mode(p, method)

    def target_for(name: str, sparsity: float) -> Target:
        if not target.reallocation or realloc_mode is True or producers(engine.model, name) is not None:
            return replace(target, name=name, sparsity=sparsity)
        blocks = head_blocks(engine.model, name)  # absorbed: an attention's output projection reorders within heads
        absorbable = blocks is not None and target.nm is not None and blocks[0] % target.nm[1] == 0
        return replace(target, name=name, sparsity=sparsity, reallocation=absorbable, blocks=blocks if absorbable else None)

    def targets_for(index: int, linears: dict[str, torch.nn.Linear],
                    layer_stats: dict[str, ChannelStats]) -> dict[str, Target]:
        sparsity = layer_target(target.sparsity, layer_sparsity, index)
        if allocation == "uniform":
            return {name: target_for(name, sparsity) for name in linears}
        sparsities = energy_sparsities(linears, layer_stats, sparsity, p.allocation_spread)
        return {name: target_for(name, s) for name, s in sparsities.items()}

    result = engine.run(method, targets_for, p.targets, p.ignore, batches, stats=stats, sequential=sequential,
                        true_sequential=p.true_sequential, skip_first=skip,
                        resume=placement.resume, on_layer_done=placement.on_layer_done)
    if realloc_mode == "absorbed" and not any(
            "channel_permutation" in r.info for layer in result.layers for r in layer.linears.values()):
        notes.append("reallocation absorbed: no MLP down projection or attention output projection of this architecture "
                     "can take a permutation of its inputs (fused or normalised in between), so every linear kept the "
                     "stored channel order")
    skipped = sorted({n for layer in result.layers for n, r in layer.linears.items() if "mean_compensation" in r.info})
    if skipped:
        notes.append(f"mean compensation skipped for {len(skipped)} linears whose architecture cannot take a bias "
                     f"(e.g. {skipped[0]})")
    return Pruned(engine, result, mode, notes, skip, layer_sparsity, shared and used_dense, residual_permuted)


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


def check_stats(stats_path: Path, shapes: dict[str, tuple[int, int]], cfg: Config, method: Method) -> dict[str, ChannelStats]:
    """Load a ``--stats`` file and check it covers every target linear with what the method needs.

    The file's statistics leave out the first positions its calibrate run chose; they cannot be
    recomputed without data. A config that sets another ``calibration.skip_first_tokens`` is refused;
    one that leaves it to the method takes the file's (set in ``cfg``, so statprune.yaml repeats the run).
    """
    if method.needs_output_pass:
        raise InputError("--stats: the method's measured compensation needs calibration data; drop --stats or change "
                         "pruning.options.compensation")
    stats, skip = load_stats(stats_path)
    for name, (_, cols) in shapes.items():
        if name not in stats or stats[name].sum.numel() != cols:
            raise InputError(f"--stats: {stats_path} has no statistics of {cols} channels for {name}")
        if method.needs_gram and stats[name].gram is None:
            raise InputError(f"--stats: {stats_path} has no input Hessian for {name}; {method.name} needs one "
                             f"(run `statprune calibrate` with pruning.method: {method.name})")
        if method.sketch_rank and stats[name].probed(method.sketch_rank) is None:
            raise InputError(f"--stats: {stats_path} has no {method.sketch_rank}-probe sketch of the input Hessian for "
                             f"{name}; pruning.options.compensation needs one (run `statprune calibrate` with the same options)")
    wanted = cfg.calibration.skip_first_tokens
    if skip is not None and wanted is not None and wanted != skip:
        raise InputError(f"--stats: {stats_path} leaves out the first {skip} position(s) of each window, "
                         f"calibration.skip_first_tokens asks for {wanted}; run `statprune calibrate` with {wanted} or drop the key")
    if skip is not None:
        cfg.calibration.skip_first_tokens = skip
    return stats


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
    if method.needs_output_pass and launched_world_size() > 1:
        raise ConfigError("pruning.options.compensation", "expected a closed-form compensation under a launcher: the "
                                                          "measured ones run in one process only")
    streaming = decide_streaming(cfg)

    with timer.phase("prepare"):
        model_config = load_model_config(cfg.model)
        shapes = check_against_model(cfg, model_config)
        stats = check_stats(stats_path, shapes, cfg, method) if stats_path else None
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
        run = Run(cfg, method, list(shapes), batches, stats, stats_path, evals, device, ui, timer, comm)
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
    cfg, timer = run.cfg, run.timer
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
    cfg, timer, comm = run.cfg, run.timer, run.comm
    with partial_dir(out, rename=comm.is_main) as partial:
        with timer.phase("load"):
            run.ui.log(f"streaming {cfg.model.name_or_path} ({cfg.model.dtype}): one decoder layer in memory at a time")
            model = load_skeleton(cfg.model, model_config, checkpoint)
        layers_name, layers = find_decoder_layers(model)
        output = StreamingOutput(partial, checkpoint, layers_name, len(layers),
                                 {**cfg.to_dict(), "resolved": resolved_choices(cfg, run.method)}, comm, run.batches)
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

    cfg: Config
    method: Method
    linear_names: list[str]
    batches: list[torch.Tensor] | None
    stats: dict[str, ChannelStats] | None
    stats_path: Path | None
    evals: list[EvalSet]
    device: torch.device
    ui: UI
    timer: Timer
    comm: Communicator

    def prune_and_evaluate(self, model: torch.nn.Module, placement: Placement,
                           weights_written: Callable[[], Checkpoint] | None = None) -> tuple[Pruned, list[dict[str, Any]]]:
        """Prune, then evaluate; streaming evaluates from the written output (``weights_written()`` gives it)."""
        with self.timer.phase("prune"):
            pruned = prune_model(self.cfg, model, self.method, self.linear_names, self.batches, self.stats, self.device,
                                 self.ui, self.stats_path, placement=placement)
        engine = pruned.engine
        if weights_written is not None:
            written = weights_written()
            eval_io = StreamedLayers(written, engine.layers_name, torch_dtype(self.cfg.model.dtype))
            engine = Placement(eval_io, placement.activation_dir, comm=self.comm).engine(model, self.device, self.cfg, self.ui)
        with self.timer.phase("eval"):
            ppl = perplexities(self.cfg, engine, self.evals, self.ui)
        return pruned, ppl

    def report(self, pruned: Pruned, ppl: list[dict[str, Any]], calibration: str, all_params: dict[str, Any] | None,
               out: Path) -> dict[str, Any]:
        p = self.cfg.pruning
        target = base_target(self.cfg, self.method)
        rows, totals = layer_summary(pruned.result, lambda i: layer_target(target.sparsity, pruned.layer_sparsity, i))
        realloc = reallocation_mode(self.cfg.pruning, self.method)
        versions = package_versions()
        return {
            "statprune_version": versions["statprune"],
            "model": self.cfg.model.name_or_path,
            "method": p.method,
            "options": asdict(self.method.options),
            "pattern": p.pattern,
            "pattern_label": pattern_label(self.cfg, target, realloc, pruned.residual_permuted),
            "reallocation": realloc,
            "lsa": target.lsa,
            "residual_permutation": pruned.residual_permuted,
            "target_sparsity": target.sparsity,
            "profile": p.profile,
            "layer_target_sparsity": pruned.layer_sparsity,
            "allocation": allocation_mode(p, self.method),
            "mode": pruned.mode,
            "streaming": isinstance(pruned.engine.io, StreamedLayers),
            "calibration": {**asdict(self.cfg.calibration), "description": calibration,
                            "statistics_skip_first_tokens": pruned.skip},
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
        (folder / "statprune.yaml").write_text(dump_config(self.cfg))
        report["timings"] = {k: round(v, 3) for k, v in self.timer.phases.items()}
        report["memory"] = peak_memory()
        report["extras_file"] = EXTRAS_NAME if (folder / EXTRAS_NAME).is_file() else None
        (folder / "report.json").write_text(strict_json(report))


def pattern_label(cfg: Config, target: Target, reallocation: bool | str, residual: bool = False) -> str:
    p = cfg.pruning
    if target.nm:
        where = {True: ", channel reallocation", "absorbed": ", channel reallocation where absorbed"}
        orders = where.get(reallocation, "") + (", residual stream permuted" if residual else "")
        return p.pattern + orders + (" (LSA-refined)" if orders and target.lsa else "")
    owl = ", OWL layer profile" if p.profile == "owl" else ""
    return f"{p.sparsity:.0%} unstructured (per {target.granularity}{owl})"


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
    with reading_engine(cfg, device, streaming, output, ui) as engine:
        p = cfg.pruning
        method = config_method(cfg)
        skip = statistics_skip(cfg, method)
        result = engine.run(None, None, p.targets, p.ignore, batches, skip_first=skip,
                            gram=method.needs_gram, sketch=method.sketch_rank, sketch_every=method.sketch_every)
    summary = {"stats_file": str(output), "model": cfg.model.name_or_path, "calibration": calibration,
               "skip_first_tokens": skip, "world_size": engine.comm.world_size,
               "seconds": round(time.perf_counter() - t0, 3), "inputs": summarize_stats(result.stats)}
    if not engine.comm.is_main:  # every process holds the same statistics; rank 0 writes them
        return summary
    save_stats(result.stats, output, {"model": cfg.model.name_or_path, "calibration": calibration,
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
