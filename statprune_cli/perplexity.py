"""Perplexity with the GPTQ / SparseGPT / Wanda protocol, layer by layer.

The text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (tail
dropped); ppl = exp(mean token NLL). Where the model's tokenizer adds BOS, each window is BOS
then ``seqlen - 1`` text tokens, and BOS is never scored (``eval.bos``; false keeps the papers'
single token stream). The forward pass goes through the layer-wise engine, so a
model that only fits one layer at a time on the device can be evaluated too. Under torchrun each
process evaluates its share of the windows; the per-window NLL sums are gathered and added in
window order, so the perplexity is the same, bit for bit, on any number of processes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from statprune_cli.config import Config, DataConfig
from statprune_cli.data import batched, eval_text, eval_windows, window_bos
from statprune_cli.engine import LayerwiseEngine
from statprune_cli.errors import PruneError
from statprune_cli.memory import trim_heap
from statprune_cli.ui import UI


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor
    seqlen: int
    max_tokens: int | None
    bos: bool


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    seqlen: int
    windows: int
    tokens: int
    max_tokens: int | None
    dtype: str
    bos: bool  # each window started with BOS
    scored_tokens: int  # the predicted tokens: every window position but the first

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_set(tokenizer: PreTrainedTokenizerBase, data: DataConfig, seqlen: int, max_tokens: int | None,
                  key: str = "eval", bos: bool | str = "auto") -> EvalSet:
    """Tokenize the evaluation text once, up front, so a bad data set fails before any heavy work.

    Without per-window BOS the text is tokenized as the papers do, special tokens included (one BOS at the start of
    the stream where the tokenizer adds it).
    """
    bos_id = window_bos(tokenizer, bos, "eval.bos")
    ids = tokenizer(eval_text(data, key), add_special_tokens=bos_id is None, return_tensors="pt").input_ids[0]
    name = data.dataset + (f"[{data.split}]" if data.split else "")
    return EvalSet(name, eval_windows(ids, seqlen, max_tokens, bos_id), seqlen, max_tokens, bos_id is not None)


# Positions per block of logits: a window's logits and the softmax's copy are positions x vocabulary floats each
# (2 GiB for 2048 positions of a 128k vocabulary), so they are made and consumed a block at a time.
LOGIT_BLOCK = 256
MAX_LOG_PERPLEXITY = math.log(sys.float_info.max)  # above it exp() overflows


@torch.no_grad()
def window_nll(engine: LayerwiseEngine, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Sum of next-token NLL over every window (of every process), and the number of predicted tokens."""
    batches = engine.comm.shard(batched(windows, batch_size))
    final = engine.hidden_states(batches)
    per_batch: list[tuple[float, int]] = []
    with engine.ui.progress("eval windows", len(batches)) as advance:
        for ids, hidden in zip(batches, final):
            nll = 0.0
            for start in range(0, ids.shape[1] - 1, LOGIT_BLOCK):
                positions = torch.arange(start, min(start + LOGIT_BLOCK, ids.shape[1] - 1))
                logits = engine.logits(ids, hidden, positions).float()
                target = ids[:, positions + 1].to(logits.device)
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            per_batch.append((nll, ids.shape[0] * (ids.shape[1] - 1)))
            advance()
    every = engine.comm.gather_ordered(per_batch)
    return sum(nll for nll, _ in every), sum(n for _, n in every)


def evaluate_perplexity(engine: LayerwiseEngine, eval_set: EvalSet, batch_size: int) -> PerplexityResult:
    """A non-finite perplexity is an error, not a number to report: nan or inf in the model's outputs (a weight
    outside the pruned linears, say) would otherwise pass as a result."""
    nll, count = window_nll(engine, eval_set.windows, batch_size)
    dtype = str(next(engine.model.parameters()).dtype).replace("torch.", "")
    mean = nll / count
    if not math.isfinite(mean) or mean > MAX_LOG_PERPLEXITY:
        raise PruneError(f"perplexity on {eval_set.name} is not finite (mean NLL {mean}): the model's outputs hold "
                         f"nan or inf ({dtype}); check the checkpoint's weights outside the pruned linears")
    w = eval_set.windows
    return PerplexityResult(eval_set.name, math.exp(mean), eval_set.seqlen, w.shape[0], w.numel(), eval_set.max_tokens,
                            dtype, eval_set.bos, count)


def eval_sets(cfg: Config, tokenizer: Any) -> list[EvalSet]:
    e = cfg.eval
    sets = [load_eval_set(tokenizer, d, e.seqlen, e.max_tokens, key=f"eval.datasets[{i}]", bos=e.bos)
            for i, d in enumerate(e.datasets)]
    trim_heap()
    return sets


def perplexities(cfg: Config, engine: LayerwiseEngine, evals: list[EvalSet], ui: UI) -> list[dict[str, Any]]:
    out = []
    for es in evals:
        ui.log(f"evaluating perplexity on {es.name}")
        out.append(evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict())
    return out

