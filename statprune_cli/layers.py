"""Find a model's decoder layers and the linear layers to prune, with no per-architecture code.

The decoder stack is the ``nn.ModuleList`` of ``config.num_hidden_layers`` identical blocks that
hold linear layers. Targets and ignores follow llm-compressor: a class name, an exact module
name, or ``re:<regex>`` matched from the start of the full module name.
"""

from __future__ import annotations

import re

from torch import nn

from statprune_cli.errors import InputError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, ModuleList) of decoder blocks: the longest list of same-class blocks with linears."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if expected is not None and len(module) == expected:
            return name, module
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise InputError(f"model: found no stack of decoder layers in {type(model).__name__}")
    return best


def name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    return name_matches(pattern, name) or pattern == type(module).__name__


def target_linears(layer: nn.Module, prefix: str, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """Linear layers of one decoder block selected by targets and not by ignore, by full name."""
    found = {}
    for sub, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{prefix}.{sub}"
        if any(matches(p, name, module) for p in targets) and not any(matches(p, name, module) for p in ignore):
            found[name] = module
    return found
