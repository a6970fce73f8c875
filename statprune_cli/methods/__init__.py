"""The method registry: ``pruning.method`` names a class here. Adding a method = one file + one line."""

from __future__ import annotations

from statprune_cli.schema import parse_pattern
from statprune_cli.methods.base import Method, Options, Outcome, Target
from statprune_cli.methods.magnitude import Magnitude
from statprune_cli.methods.ria import RIA
from statprune_cli.methods.sparsegpt import SparseGPT
from statprune_cli.methods.statprune import StatPrune
from statprune_cli.methods.wanda import Wanda

METHODS: dict[str, type[Method]] = {m.name: m for m in (Magnitude, Wanda, SparseGPT, RIA, StatPrune)}


def build_method(name: str, options: dict, pattern: str = "unstructured") -> Method:
    """``pattern`` (pruning.pattern) settles the options a method leaves to it (statprune's statistics and passes)."""
    cls = METHODS[name]
    return cls(cls.Options.from_dict(options), parse_pattern(pattern))


__all__ = ["METHODS", "Method", "Options", "Outcome", "Target", "build_method"]
