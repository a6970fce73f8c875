"""The pre-passes: what runs before the engine so that every linear's target is known when its layer comes.

Dense-model statistics collected once (OWL's outlier ratios, the residual order, a sweep's cells), OWL's layer
profile, the residual stream's order for N:M, and the per-linear targets (plan, profile, energy allocation and what
the architecture can absorb) that the engine asks for layer by layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from statprune_cli.allocation import energy_sparsities
from statprune_cli.engine import Collect, LayerwiseEngine, Selection
from statprune_cli.methods import Target
from statprune_cli.permute import RESIDUAL_ROWS, RESIDUAL_TOKENS, ResidualPlan, head_blocks, producers, residual_order, residual_plan
from statprune_cli.plan import Plan
from statprune_cli.profile import outlier_ratio, owl_sparsities
from statprune_cli.sketch import resolve_every
from statprune_cli.stats import ChannelStats
from statprune_cli.ui import UI


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


def owl_profile(engine: LayerwiseEngine, plan: Plan, stats: dict[str, ChannelStats]) -> list[float]:
    """OWL's sparsity per decoder layer, from each layer's share of outlier scores."""
    ratios = [outlier_ratio(engine.linears(i, plan.selection()), stats, plan.owl_m) for i in range(len(engine.layers))]
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
    base = stats if stats is not None else dense.get(engine, plan.collect(matrices=False), RESIDUAL_TOKENS)
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

