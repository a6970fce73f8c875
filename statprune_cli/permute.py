"""Channel permutations the model absorbs, so that a reallocated N:M weight is N:M as stored.

Channel reallocation (``pruning.reallocation``) chooses a linear's N:M mask with its input channels in
another order. Where those inputs are an elementwise function of other linears' outputs (an MLP's down
projection reads ``act(gate(x)) * up(x)``, OPT's fc2 reads ``act(fc1(x))``), reordering those linears'
rows (and biases) in the same way leaves the layer's function unchanged: the consumer can then be stored
with its columns in the reallocation order, where its mask is N:M as it stands, and no runtime has to
gather its input. Rows are free to move for the producers' own N:M masks too, which run along their inputs.

The attention output projection reads each head's mix of the value rows, so its channels may move only
inside a head, and alike for all the heads that read one key/value head (GQA): such a linear is
absorbable with a constrained order (``Absorbable.blocks``). q/k/v and gate/up read the residual stream,
whose order every layer shares: their permutations stay in the output's pruning_extras.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# A linear's leaf name -> its siblings whose output rows are its input channels, and whether those are head outputs.
PRODUCERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "down_proj": (("gate_proj", "up_proj"), False),  # Llama, Mistral, Qwen2/3, Gemma (and their MoE experts)
    "fc2": (("fc1",), False),  # OPT, Phi
    "dense_4h_to_h": (("dense_h_to_4h",), False),  # GPT-NeoX, Falcon
    "o_proj": (("v_proj",), True),  # Llama-like attention
    "out_proj": (("v_proj",), True),  # OPT attention
}


@dataclass
class Absorbable:
    """The linears that make a linear's input channels (one output row each), and how its order is bound."""

    producers: list[nn.Linear]
    names: list[str]
    blocks: tuple[int, int] | None = None  # (head_dim, heads per key/value head): moves only inside heads, alike per group


def absorbable(model: nn.Module, name: str) -> Absorbable | None:
    """How ``model`` can take a new input order for linear ``name``; None where it cannot."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in PRODUCERS:
        return None
    names, per_head = PRODUCERS[leaf]
    parent = model.get_submodule(parent_name)
    consumer = getattr(parent, leaf)
    found = [getattr(parent, p, None) for p in names]
    if not all(isinstance(p, nn.Linear) for p in found):
        return None  # e.g. Phi-3's fused gate_up_proj, GPT-NeoX's fused query_key_value
    if not per_head:
        return Absorbable(found, list(names)) if all(p.out_features == consumer.in_features for p in found) else None
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads or consumer.in_features % heads:
        return None
    head_dim = consumer.in_features // heads
    if getattr(cfg, "head_dim", None) not in (None, head_dim) or found[0].out_features % head_dim:
        return None
    kv_heads = found[0].out_features // head_dim
    if heads % kv_heads:
        return None
    return Absorbable(found, list(names), (head_dim, heads // kv_heads))


def producer_order(order: torch.Tensor, blocks: tuple[int, int] | None) -> torch.Tensor | None:
    """The producers' row order that matches the consumer's column ``order``; None if ``order`` breaks the blocks."""
    if blocks is None:
        return order
    size, shared = blocks
    within = order.reshape(-1, size) - torch.arange(0, order.numel(), size).unsqueeze(1)  # each head's own order
    per_group = within[::shared]
    if bool((within != per_group.repeat_interleave(shared, 0)).any()) or bool((within.sort(1).values != torch.arange(size)).any()):
        return None
    return (per_group + torch.arange(0, per_group.numel(), size).unsqueeze(1)).reshape(-1)


def absorb(model: nn.Module, name: str, order: torch.Tensor) -> list[str] | None:
    """Store ``name``'s columns in ``order`` and its producers' rows to match; the producers' leaf names, or None
    (nothing changed) where the model cannot take that order."""
    found = absorbable(model, name)
    rows = None if found is None else producer_order(order.long().cpu(), found.blocks)
    if found is None or rows is None:
        return None
    consumer = model.get_submodule(name)
    consumer.weight.data.copy_(consumer.weight.data.index_select(1, order.to(consumer.weight.device, torch.long)))
    for p in found.producers:
        p.weight.data.copy_(p.weight.data.index_select(0, rows.to(p.weight.device)))
        if p.bias is not None:
            p.bias.data.copy_(p.bias.data.index_select(0, rows.to(p.bias.device)))
    return found.names
