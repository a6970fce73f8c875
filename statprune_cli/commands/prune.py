"""``statprune prune``: check, plan, load, calibrate, prune layer by layer, evaluate, write the folder and its report.

Every check that can fail on bad input runs before the weights load. The model is pruned in CPU memory (one layer on
the device at a time) or, when it does not fit, streamed from its checkpoint and written layer by layer, resumably.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from statprune_cli.config import Config, dump_config, parse_size
from statprune_cli.data import calibration_batches
from statprune_cli.distributed import Communicator, launched
from statprune_cli.engine import Resume
from statprune_cli.errors import ConfigError
from statprune_cli.export import EXTRAS_NAME, atomic_dir, check_output_dir, save_model_folder, write_extras
from statprune_cli.layers import find_decoder_layers
from statprune_cli.load import check_against_model, load_model, load_model_config, load_tokenizer, torch_dtype
from statprune_cli.lock import prune_output
from statprune_cli.memory import trim_heap
from statprune_cli.perplexity import EvalSet, eval_sets, perplexities
from statprune_cli.plan import Plan, make_plan
from statprune_cli.pruning import PruneInputs, Pruned, check_stats, config_method, layer_target, needs_batches, prune_model
from statprune_cli.report import layer_summary, model_sparsity, package_versions, peak_memory, strict_json, zeros_before_note
from statprune_cli.runtime import Placement, Timer, activation_folder, check_world, decide_streaming, setup_runtime
from statprune_cli.streaming import (Checkpoint, StreamedLayers, StreamingOutput, folder_sparsity, load_skeleton, partial_dir,
                                     resolve_folder, tokenizer_folder)
from statprune_cli.ui import UI
from statprune_cli.zeroshot import check_tokenizer, evaluate_zeroshot, prepare_zeroshot


def run_prune(cfg: Config, overwrite: bool = False, stats_path: Path | None = None, ui: UI | None = None) -> dict[str, Any]:
    """Prune the model of ``cfg`` and write the output folder; returns the report."""
    ui = ui or UI()
    if not cfg.output.dir:
        raise ConfigError("output.dir", "required: where to write the pruned model (or pass --output)")
    with prune_output(cfg, ui.log):  # room for the output, its lock, what a killed run left: before the model loads
        return prune(cfg, overwrite, stats_path, ui)


def prune(cfg: Config, overwrite: bool, stats_path: Path | None, ui: UI) -> dict[str, Any]:
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
                                 {**cfg.to_dict(), "plan": run.inputs.plan.to_dict()}, comm, run.inputs.batches,
                                 run.inputs.stats_path)
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
            "notes": pruned.notes + zeros_before_note(totals),
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

