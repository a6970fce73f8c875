"""Channel permutations the model absorbs, so that a reallocated N:M weight is N:M as stored.

Channel reallocation (``pruning.reallocation``) chooses a linear's N:M mask with its input channels in
another order. Where those inputs are an elementwise function of other linears' outputs (an MLP's down
projection reads ``act(gate(x)) * up(x)``, OPT's fc2 reads ``act(fc1(x))``), reordering those linears'
rows (and biases) in the same way leaves the layer's function unchanged: the down projection can then be
stored with its columns in the reallocation order, where its mask is N:M as it stands, and no runtime has
to gather its input. Rows are free to move for the producers' own N:M masks too, which run along their
inputs. An attention's output projection takes orders within its heads, with the value rows (``head_blocks``).
Other inputs are not absorbed one linear at a time (q/k/v and gate/up read the residual stream): their
reallocation orders stay in the output's pruning_extras.safetensors. The
residual stream can instead take one order shared by all its readers (``residual_plan``, ``residual_order``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from statprune_cli.masks import nm_kept_score, reallocation_order, refine_order

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


# An attention's output projection reads the heads' value vectors side by side. Attention mixes positions, never the
# dimensions of a value vector, so within each head they can take any order that the value projection's rows take
# too; query heads that share a key/value head (grouped-query attention) share its order.
HEAD_PRODUCERS: dict[str, str] = {"o_proj": "v_proj", "out_proj": "v_proj"}
HEAD_KNOWN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "q_norm", "k_norm"})


def head_blocks(model: nn.Module, name: str) -> tuple[int, int] | None:
    """(head width, query heads per key/value head) of the output projection ``name``, whose input channels can take
    an order within heads that its value projection's rows take too; None where that is not known to hold."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in HEAD_PRODUCERS:
        return None
    attention = model.get_submodule(parent_name)
    out, values, width = getattr(attention, leaf), getattr(attention, HEAD_PRODUCERS[leaf], None), getattr(attention, "head_dim", None)
    if not (isinstance(values, nn.Linear) and isinstance(width, int) and width > 0 and values.out_features % width == 0
            and out.in_features % values.out_features == 0):
        return None
    # anything else in the attention with a head's width or the values' may index the same dimensions (a value norm)
    others = [t for n, t in (*attention.named_parameters(), *attention.named_buffers()) if n.split(".")[0] not in HEAD_KNOWN]
    if any(width in t.shape or values.out_features in t.shape for t in others):
        return None
    return width, out.in_features // values.out_features


def head_tied(order: torch.Tensor, width: int, share: int) -> torch.Tensor | None:
    """The value projection's row order that matches the output projection's column ``order``, or None where
    ``order`` moves a channel out of its head or gives heads that share values different orders."""
    within = order.view(-1, share, width) - torch.arange(0, len(order), width, device=order.device).view(-1, share, 1)
    if not ((within >= 0) & (within < width) & (within == within[:, :1])).all():
        return None
    first = within[:, 0]
    return (first + torch.arange(0, first.numel(), width, device=order.device).view(-1, 1)).reshape(-1)


def absorb(model: nn.Module, name: str, order: torch.Tensor) -> list[str] | None:
    """Store ``name``'s columns in ``order`` and its producers' rows to match; the producers' leaf names, or None
    (nothing changed) where the model cannot absorb the permutation."""
    parent, _, leaf = name.rpartition(".")
    found = producers(model, name)
    if found is not None:
        rows = [(f"{parent}.{p}.{n}", 0) for p, lin in zip(PRODUCERS[leaf], found) for n, _ in lin.named_parameters()]
        _permute(model, [(f"{name}.weight", 1), *rows], order)
        return list(PRODUCERS[leaf])
    blocks = head_blocks(model, name)
    value_order = None if blocks is None else head_tied(order, *blocks)
    if value_order is None:
        return None
    values = f"{parent}.{HEAD_PRODUCERS[leaf]}"
    _permute(model, [(f"{name}.weight", 1)], order)
    _permute(model, [(f"{values}.{n}", 0) for n, _ in model.get_submodule(values).named_parameters()], value_order)
    return [HEAD_PRODUCERS[leaf]]


# The residual stream. Every decoder layer reads it through a norm and adds its attention and MLP outputs to it, so
# one permutation of its channels, applied to every tensor that indexes them (the readers' columns, the writers'
# rows and biases, the norms, the embeddings and the head), changes no function. Chosen for all readers at once,
# it spreads the N:M groups of q/k/v and gate/up as reallocation does, with every stored weight still N:M.
RESIDUAL_READERS = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1"})
RESIDUAL_WRITERS = frozenset({"o_proj", "down_proj", "out_proj", "fc2"})
RESIDUAL_ROWS = 16384  # reader rows the order is chosen on (an evenly strided sample): the LSA's work grows with them
RESIDUAL_TOKENS = 4096  # calibration tokens of the dense pass the readers' scores come from (docs/results/residual-budget.md)


@dataclass
class ResidualPlan:
    """The tensors that index the residual stream's channels, each with the dimension that does: inside a decoder
    layer (names relative to it, the same in every layer) and outside the layers (full names)."""

    layer: list[tuple[str, int]]
    outside: list[tuple[str, int]]
    readers: list[str]  # the reading linears, relative to their layer

    def permute_layer(self, layer: nn.Module, order: torch.Tensor) -> None:
        _permute(layer, self.layer, order)

    def permute_outside(self, model: nn.Module, order: torch.Tensor) -> None:
        _permute(model, self.outside, order)

    def reader_names(self, layers_name: str, num_layers: int) -> dict[int, list[str]]:
        """Each decoder layer's reading linears, by full module name."""
        return {i: [f"{layers_name}.{i}.{r}" for r in self.readers] for i in range(num_layers)}


@torch.no_grad()
def _permute(module: nn.Module, entries: list[tuple[str, int]], order: torch.Tensor) -> None:
    """Reorder each ``(name, dim)`` tensor of ``module`` by ``order``, in place: a new tensor per weight left the loaded
    (memory-mapped) storage resident beside the permuted copies (the wide model's 2:4 residual permutation peaked at
    8.3 GB RSS against 4.5 GB without it)."""
    for name, dim in entries:
        t = module.get_parameter(name)
        t.data.copy_(t.data.index_select(dim, order.to(t.device, torch.long)))


def residual_plan(model: nn.Module, layers_name: str, hidden: int) -> ResidualPlan | str:
    """Where ``model`` indexes its residual stream (width ``hidden``), or why that is not known for it.

    Linears are told apart by name (a reader takes ``hidden`` inputs, a writer makes ``hidden`` outputs), and any
    other tensor with a dimension of that width must be a norm's vector or an embedding, else the architecture is not
    known well enough to permute (a fused projection, a router, an input projection): nothing is guessed.
    """
    layers = model.get_submodule(layers_name)
    inside: list[tuple[str, int]] = []
    readers: list[str] = []
    for name, module in layers[0].named_modules():
        own = [(f"{name}.{n}" if name else n, t) for n, t in module.named_parameters(recurse=False)]
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Linear):
            if leaf in RESIDUAL_READERS and module.in_features == hidden:
                inside.append((f"{name}.weight", 1))
                readers.append(name)
            elif leaf in RESIDUAL_WRITERS and module.out_features == hidden:
                inside += [(n, 0) for n, _ in own]
            else:
                return f"{layers_name}.0.{name} is not a known reader or writer of the residual stream"
            continue
        for n, t in own:
            if tuple(t.shape) == (hidden,):
                inside.append((n, 0))  # a norm's weight or bias
            elif hidden in t.shape:
                return f"{layers_name}.0.{n} {tuple(t.shape)} may index the residual stream in a way not known"
    if not readers:
        return f"no linear in {layers_name}.0 reads the residual stream under a known name"
    outside: list[tuple[str, int]] = []
    for n, t in model.named_parameters():  # a tied head is the embeddings' tensor, listed once
        if n.startswith(layers_name + "."):
            continue
        owner = model.get_submodule(n.rpartition(".")[0])
        if isinstance(owner, (nn.Embedding, nn.Linear)) and t.dim() == 2 and t.shape[1] == hidden:
            outside.append((n, 1))  # token and learned position embeddings, the head
        elif tuple(t.shape) == (hidden,):
            outside.append((n, 0))
        elif hidden in t.shape:
            return f"{n} {tuple(t.shape)} may index the residual stream in a way not known"
    return ResidualPlan(inside, outside, readers)


def residual_order(scores: Iterable[torch.Tensor], total_rows: int, n: int, m: int, lsa: bool,
                   rows: int = RESIDUAL_ROWS) -> tuple[torch.Tensor, int, float]:
    """One reallocation order of the residual stream for all of its readers, from their scores (``scores``: one
    matrix per reader, ``total_rows`` rows in all). Each reader is scaled to mean 1, so every linear weighs the same,
    and contributes an evenly strided share of its rows when they number more than ``rows``: the order is chosen on
    at most that many, which bounds memory and the LSA's cost on any model. Returns the order, the rows it was
    chosen on, and the N:M kept score it gains on them against the stored order."""
    step = max(1, -(-total_rows // rows))
    # the sampled rows are copied out before the next reader's score is made: only one full score matrix at a time
    stacked = torch.cat([(s[::step] / s.mean().clamp_min(1e-30)).float().cpu() for s in scores])  # a dead reader: zeros
    order = reallocation_order(stacked, m)
    if lsa:
        order = refine_order(stacked, order, n, m)
    gain = nm_kept_score(stacked, n, m, order) / nm_kept_score(stacked, n, m) - 1.0
    return order, stacked.shape[0], gain
