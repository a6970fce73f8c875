"""Pruning a loaded model under a plan: the pre-passes, then the layer-wise engine with the plan's method.

Every command that prunes (``prune``, ``sweep``) goes through ``prune_model``; the engine knows no method and no
pre-pass, only the ``Job`` built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from statprune_cli.config import Config
from statprune_cli.engine import EngineResult, Job, LayerwiseEngine
from statprune_cli.errors import InputError
from statprune_cli.methods import Method, build_method
from statprune_cli.plan import Plan
from statprune_cli.prepasses import DenseStats, LinearTargets, owl_profile, permute_residual
from statprune_cli.runtime import Placement
from statprune_cli.stats import ChannelStats, load_stats
from statprune_cli.ui import UI


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


def config_method(cfg: Config) -> Method:
    """The method ``pruning`` asks for, its ``auto`` options settled by the pattern and sparsity."""
    p = cfg.pruning
    return build_method(p.method, p.options, p.pattern)


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


def layer_target(base: float, owl: list[float] | None, index: int) -> float:
    """Decoder layer ``index``'s sparsity: OWL's where the profile gave one, else the run's (``base``)."""
    return base if owl is None else owl[index]


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
                             f"{name}; statprune's ADMM update needs one (run `statprune calibrate` with the same config)")
    wanted = cfg.calibration.skip_first_tokens
    if skip is not None and wanted is not None and wanted != skip:
        raise InputError(f"--stats: {stats_path} leaves out the first {skip} position(s) of each window, "
                         f"calibration.skip_first_tokens asks for {wanted}; run `statprune calibrate` with {wanted} or drop the key")
    return stats, skip


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
    dense = dense or DenseStats(plan.selection(), inputs.batches, ui)
    mode = describe_mode(plan, method, inputs.stats_path)
    notes: list[str] = []
    used_dense = False  # statistics from ``dense``: for the masks, or for OWL's ratios or the residual order
    dense_only = not (plan.sequential or plan.true_sequential)
    if stats is None and method.needs_calibration and dense_only and (shared or plan.profile == "owl"):
        stats, used_dense = dense.get(engine, plan.collect()), True
        mode += " (dense statistics collected once, " + ("shared by the sweep's cells)" if shared else "for OWL and the masks)")
    layer_sparsity = None
    if plan.profile == "owl":
        used_dense = used_dense or stats is None
        layer_sparsity = owl_profile(engine, plan, stats if stats is not None else dense.get(engine, plan.collect(matrices=False)))
        notes.append(f"OWL layer sparsities (M {plan.owl_m:g}, lambda {plan.owl_lam:g}): "
                     + ", ".join(f"{s:.3f}" for s in layer_sparsity))
    residual_permuted = False
    if plan.residual_permutation:
        used_dense = used_dense or stats is None
        stats, note, residual_permuted = permute_residual(engine, plan, stats, dense)
        notes.append(note)
    job = Job(method, LinearTargets(plan, engine.model, layer_sparsity), plan.selection(), plan.collect(),
              plan.sequential, plan.true_sequential, stats)
    result = engine.run(job, inputs.batches, placement.resume, placement.on_layer_done)
    if plan.reallocation == "absorbed" and not any(r.reordered for layer in result.layers for r in layer.linears.values()):
        notes.append("reallocation absorbed: no MLP down projection or attention output projection of this architecture "
                     "can take a permutation of its inputs (fused or normalised in between), so every linear kept the "
                     "stored channel order")
    return Pruned(engine, result, mode, notes, layer_sparsity, shared and used_dense, residual_permuted)

