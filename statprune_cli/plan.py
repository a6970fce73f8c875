"""The plan: every decision of a prune, resolved once from the config and the method.

A config leaves much unset ("the method decides": calibration mode, positions left out of the statistics,
reallocation, residual permutation, allocation, sketch stride, OWL's threshold, ...). ``make_plan`` settles all of
it in one place; everything downstream reads the plan, never the config's unset keys or the method's defaults.
report.json holds it under ``plan``, statprune.yaml is the config with the plan's decisions written in (so a rerun
repeats the run even after a default changes), and a resumed streaming run compares it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from statprune_cli import __version__
from statprune_cli.engine import Collect, Selection
from statprune_cli.methods import Method, Target, build_method
from statprune_cli.schema import parse_pattern
from statprune_cli.sketch import auto_every

if TYPE_CHECKING:  # config.py validates with a plan: the config module imports this one
    from statprune_cli.config import Config


@dataclass(frozen=True)
class Plan:
    """A prune's decisions; no field is left to a default decided elsewhere."""

    statprune_version: str
    method: str
    options: dict[str, Any]  # the method's options, resolved (statprune: preset, sketch rank and stride)
    pattern: str  # "unstructured" or "N:M"
    sparsity: float  # the run's target (N/M for a pattern); OWL spreads it over the layers
    granularity: str  # row or matrix: where unstructured scores are compared
    sequential: bool  # each layer calibrated on the pruned layers' outputs (two passes), else on the dense model's
    true_sequential: bool
    skip_first_tokens: int  # positions at the start of each window left out of the statistics
    gram: bool  # statistics carry sum x x^T (SparseGPT)
    sketch_rank: int  # probes of the sketch of sum x x^T (0: none)
    sketch_every: int  # its token stride
    reallocation: bool | str  # N:M channel reallocation: false, true or "absorbed"
    lsa: bool  # reallocation orders refined by linear sum assignment
    residual_permutation: bool  # the residual stream permuted for its readers' N:M groups
    allocation: str  # uniform or energy: a layer's sparsity over its linears
    allocation_spread: float
    profile: str  # uniform or owl: the sparsity over the layers
    owl_m: float
    owl_lam: float
    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def target(self) -> Target:
        """The target every linear starts from, before OWL, allocation and the architecture adjust it."""
        return Target(self.sparsity, self.nm, self.granularity, reallocation=bool(self.reallocation), lsa=self.lsa)

    def selection(self) -> Selection:
        return Selection(self.targets, self.ignore)

    def collect(self, matrices: bool = True) -> Collect:
        """What the plan's statistics passes gather (``matrices`` False: no Gram matrix or sketch, for OWL and the
        residual order, which read the channel statistics alone)."""
        return Collect(self.skip_first_tokens, self.gram and matrices, self.sketch_rank if matrices else 0,
                       self.sketch_every)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        return d

    def written_into(self, cfg: Config) -> Config:
        """``cfg`` with every decision of this plan set explicitly: what statprune.yaml holds."""
        out = copy.deepcopy(cfg)
        p = out.pruning
        p.granularity, p.sequential, p.reallocation, p.lsa = self.granularity, self.sequential, self.reallocation, self.lsa
        p.residual_permutation, p.allocation, p.owl.m = self.residual_permutation, self.allocation, self.owl_m
        p.options = dict(self.options)
        out.calibration.skip_first_tokens = self.skip_first_tokens
        return out


def make_plan(cfg: Config, method: Method | None = None, skip_from_file: int | None = None) -> Plan:
    """The one place where unset keys meet the method's defaults. ``skip_from_file``: the positions a statistics file
    (``--stats``) left out, which the run must take."""
    p = cfg.pruning
    method = method or build_method(p.method, p.options, p.pattern)
    nm = parse_pattern(p.pattern)
    reallocation = method.reallocation if p.reallocation is None else p.reallocation
    residual = method.residual_permutation if p.residual_permutation is None else p.residual_permutation
    reallocates = bool(reallocation) or residual
    skip = cfg.calibration.skip_first_tokens
    if skip is None:  # every position counts unless a statistics file left some out (docs/methods.md says why)
        skip = skip_from_file or 0
    every = method.sketch_every
    if method.sketch_rank and every is None:
        every = auto_every(cfg.calibration.nsamples * cfg.calibration.seqlen)
    # an option left unset where it does not apply (statprune's sketch stride with no sketch) is left out, not null
    options = {k: v for k, v in {**asdict(method.options), "sketch_every": every}.items() if v is not None}
    return Plan(
        statprune_version=__version__, method=p.method, options=options, pattern=p.pattern,
        sparsity=p.sparsity if nm is None else nm[0] / nm[1],
        granularity=p.granularity or (p.profile == "owl" and method.owl_granularity) or method.granularity,
        sequential=method.sequential if p.sequential is None else p.sequential, true_sequential=p.true_sequential,
        skip_first_tokens=skip, gram=method.needs_gram, sketch_rank=method.sketch_rank, sketch_every=every or 1,
        reallocation=reallocation, lsa=(method.lsa and reallocates) if p.lsa is None else p.lsa,
        residual_permutation=residual,
        allocation="uniform" if nm is not None else (method.allocation if p.allocation is None else p.allocation),
        allocation_spread=p.allocation_spread, profile=p.profile,
        owl_m=method.owl_m if p.owl.m is None else p.owl.m, owl_lam=p.owl.lam,
        targets=tuple(p.targets), ignore=tuple(p.ignore))
