"""Channel permutations the model absorbs, so that a reallocated N:M weight is N:M as stored.

Channel reallocation (``pruning.reallocation``) chooses a linear's N:M mask with its input channels in
another order. Where those inputs are an elementwise function of other linears' outputs (an MLP's down
projection reads ``act(gate(x)) * up(x)``, OPT's fc2 reads ``act(fc1(x))``), reordering those linears'
rows (and biases) in the same way leaves the layer's function unchanged: the down projection can then be
stored with its columns in the reallocation order, where its mask is N:M as it stands, and no runtime has
to gather its input. Rows are free to move for the producers' own N:M masks too, which run along their
inputs. Other inputs (q/k/v and gate/up read the residual stream; o_proj reads attention heads) are not
absorbed here: their permutations stay in the output's pruning_extras.safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

# A linear's leaf name -> its siblings whose output rows are its input channels, through an elementwise map.
PRODUCERS: dict[str, tuple[str, ...]] = {
    "down_proj": ("gate_proj", "up_proj"),  # Llama, Mistral, Qwen2/3, Gemma (and their MoE experts)
    "fc2": ("fc1",),  # OPT, Phi
    "dense_4h_to_h": ("dense_h_to_4h",),  # GPT-NeoX, Falcon
}


def producers(model: nn.Module, name: str) -> list[nn.Linear] | None:
    """The linears that make ``name``'s input channels, one output row per channel; None where there are none."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in PRODUCERS:
        return None
    parent = model.get_submodule(parent_name)
    consumer = getattr(parent, leaf)
    found = [getattr(parent, p, None) for p in PRODUCERS[leaf]]
    width = consumer.in_features
    if not all(isinstance(p, nn.Linear) and p.out_features == width for p in found):
        return None  # e.g. Phi-3's fused gate_up_proj
    # Anything else beside them with a dimension of that width may index the same channels (BitNet's ffn_sub_norm
    # between act(gate) * up and down_proj, Dory's per-channel gate/up scales) and would need the same order.
    own = {id(t) for m in (consumer, *found) for t in (*m.parameters(), *m.buffers())}
    if any(width in t.shape for t in (*parent.parameters(), *parent.buffers()) if id(t) not in own):
        return None
    return found  # type: ignore[return-value]


def absorb(model: nn.Module, name: str, order: torch.Tensor) -> list[str] | None:
    """Store ``name``'s columns in ``order`` and its producers' rows to match; the producers' leaf names, or None
    (nothing changed) where the model cannot absorb the permutation."""
    found = producers(model, name)
    if found is None:
        return None
    consumer = model.get_submodule(name)
    index = order.to(device=consumer.weight.device, dtype=torch.long)
    consumer.weight.data.copy_(consumer.weight.data.index_select(1, index))
    for p in found:
        p.weight.data.copy_(p.weight.data.index_select(0, index.to(p.weight.device)))
        if p.bias is not None:
            p.bias.data.copy_(p.bias.data.index_select(0, index.to(p.bias.device)))
    return list(PRODUCERS[name.rpartition(".")[2]])
