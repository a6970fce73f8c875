"""What a pruning method is: a score, a mask rule and an optional weight update.

The engine calls ``Method.prune`` once per target linear, after calibration; nothing in the
engine knows which method runs. ``prune`` writes the pruned weight in place (no second copy of a
large matrix) and returns an ``Outcome``: report figures, and the input-channel order when the N:M
groups were taken over reallocated channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from statprune_cli.schema import build
from statprune_cli.masks import make_mask, nm_kept_score, reallocation_order, refine_order
from statprune_cli.stats import ChannelStats


@dataclass
class Target:
    """The sparsity asked of one linear layer."""

    sparsity: float
    nm: tuple[int, int] | None = None
    granularity: str = "row"
    name: str = ""  # the linear's full module name, for options that apply to some linears only
    reallocation: bool = False  # N:M groups taken over the input channels in reallocation order (masks.reallocation_order)
    lsa: bool = False  # that order refined by linear sum assignment (masks.refine_order)
    # (width, share): the order stays within consecutive blocks of ``width`` channels, and each ``share`` consecutive
    # blocks take the same one (an attention's heads: permute.head_blocks)
    blocks: tuple[int, int] | None = None

    def channel_order(self, score: torch.Tensor) -> torch.Tensor:
        """The input channels in reallocation order for this target's N:M groups, refined by LSA if asked. Blocks
        that share an order choose it on their scores stacked, as one matrix with their rows."""
        assert self.nm is not None  # the config allows reallocation with N:M patterns only
        if self.blocks is None:
            return self._order(score)
        width, share = self.blocks
        tied = score.unflatten(1, (-1, share, width))  # (rows, groups of blocks, share, width)
        first = torch.arange(0, score.shape[1], width, device=score.device).view(-1, share, 1)
        orders = torch.stack([self._order(tied[:, g].reshape(-1, width)) for g in range(tied.shape[1])])
        return (first + orders[:, None, :]).reshape(-1)

    def _order(self, score: torch.Tensor) -> torch.Tensor:
        order = reallocation_order(score, self.nm[1])
        return refine_order(score, order, *self.nm) if self.lsa else order


@dataclass
class Options:
    """A method's options, read from ``pruning.options``; subclasses add fields."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Options:
        return build(cls, data, "pruning.options")


@dataclass
class Outcome:
    """What pruning one linear did besides writing its weight."""

    info: dict[str, float | int | str] = field(default_factory=dict)  # for the report
    # the input channels in the order its N:M groups were taken (``Target.reallocation``): the model absorbs it, or
    # it is saved beside the weights
    permutation: torch.Tensor | None = None


class Method:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = False  # True: the statistics must carry sum x x^T (a Hessian)
    granularity: ClassVar[str] = "row"  # the comparison group when ``pruning.granularity`` is not set
    owl_granularity: ClassVar[str | None] = None  # ... and under ``profile: owl``; None: ``granularity``
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None, nm: tuple[int, int] | None = None) -> None:
        """``nm``: the run's N:M pattern (None: unstructured), for methods whose defaults depend on it."""
        self.options = options if options is not None else self.Options()

    @property
    def sketch_rank(self) -> int:
        """Probes of the sketch of sum x x^T the statistics must carry (``sketch.py``); 0: none."""
        return 0

    @property
    def sketch_every(self) -> int | None:
        """The sketch is collected on every this many-th token (``ChannelStats.of``); None: ``sketch.auto_every``."""
        return None

    @property
    def sequential(self) -> bool:
        """Unless ``pruning.sequential`` says: True, each layer is calibrated on the outputs of the layers already
        pruned (a second pass per layer makes them); False, on the dense model's activations, in one pass per layer."""
        return True

    @property
    def reallocation(self) -> bool | str:
        """Unless ``pruning.reallocation`` says: N:M channel reallocation (false, true or "absorbed"); none, as in
        the papers of the baselines."""
        return False

    @property
    def residual_permutation(self) -> bool:
        """Unless ``pruning.residual_permutation`` says: permute the residual stream for its readers' N:M groups
        (``permute.residual_plan``); not in the baselines' papers."""
        return False

    @property
    def lsa(self) -> bool:
        """Unless ``pruning.lsa`` says: refine the reallocation order by linear sum assignment wherever the run
        reallocates; not in the baselines' papers by default (RIA's ``--lsa`` is a flag)."""
        return False

    @property
    def allocation(self) -> str:
        """Unless ``pruning.allocation`` says: how a layer's unstructured sparsity is spread over its linears
        (``allocation.py``); uniform, as in the baselines' papers."""
        return "uniform"

    @property
    def owl_m(self) -> float:
        """OWL's outlier threshold M unless ``pruning.owl.m`` says: the OWL paper's 5."""
        return 5.0

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        """Importance of each weight (higher = keep); weight is float32, shape (out, in)."""
        raise NotImplementedError

    def update(self, linear: nn.Linear, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats | None,
               target: Target, order: torch.Tensor | None = None) -> dict[str, float | int]:
        """Write the pruned weight into ``linear``; subclasses may also compensate. ``order``: the input channels'
        order of the N:M groups (``Outcome.permutation``) when the mask was taken over reallocated channels. Returns
        report figures."""
        linear.weight.data.masked_fill_(mask, 0.0)  # in place: no second copy of a large matrix
        return {}

    def mask(self, weight: torch.Tensor, score: torch.Tensor, target: Target) -> tuple[torch.Tensor, Outcome]:
        """Which weights go (True = pruned). With ``target.reallocation`` the rule (``select``) sees the input
        channels in reallocation order and its mask is mapped back, so the weights keep the layer's function and are
        N:M once their columns are put in that order (``Outcome.permutation``)."""
        if not target.reallocation:
            return self.select(score, target), Outcome()
        order = target.channel_order(score)
        chosen = self.select(score[:, order], target)
        mask = torch.empty_like(chosen)
        mask[:, order] = chosen
        stored = nm_kept_score(score, *target.nm)
        gain = float(score[~mask].sum(dtype=torch.float64)) / stored - 1.0
        return mask, Outcome({"reallocation_kept_score_gain": gain}, order.to(torch.int32))

    def select(self, score: torch.Tensor, target: Target) -> torch.Tensor:
        """The mask rule: keep the highest scores under the target's pattern."""
        return make_mask(score, target.sparsity, target.nm, target.granularity)

    def prune(self, linear: nn.Linear, stats: ChannelStats | None, target: Target) -> Outcome:
        weight = linear.weight.data.float()  # no copy of a float32 weight: nothing writes to it before ``update`` reads it
        mask, outcome = self.mask(weight, self.score(weight, stats), target)
        outcome.info = {**self.update(linear, weight, mask, stats, target, outcome.permutation), **outcome.info}
        return outcome
