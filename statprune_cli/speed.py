"""``statprune eval-speed``: what a 2:4 checkpoint gains at inference on a GPU, dense format against sparse, in one run.

Every linear whose weight is 2:4 along its input dimension (each group of 4 consecutive input weights holds at least
2 zeros) is converted with ``torch.sparse.to_sparse_semi_structured``: its kept values and their 2-bit positions go
to the sparse tensor cores through cuSPARSELt (CUTLASS where torch ships without it), compute capability 8.0 or newer.
torchao's ``sparsify_(model, semi_sparse_weight())`` was the alternative: its transform calls the same
``to_sparse_semi_structured`` on each weight, so it would add a dependency, whose releases each support a narrow range
of torch versions, for the same tensors and kernels; torch is already one.

The sparse-format model's logits are compared with the dense-format model's on a few windows of random tokens. The
kernels only sum in another order, so the difference stays at bfloat16 rounding: on SmolLM2-135M (CPU, bfloat16),
every linear summing in another order moved the logits by 0.0099 (relative L2), while a single linear of the 210 with
its values one column off moved them by 0.053 to 0.24, hence the default tolerance of 0.05. Prefill (one forward
pass keeping the last position's logits, as generation does) and greedy decode (batch 1, KV cache) are timed in eager
mode with CUDA events, after warm-up, the dense format first and then the sparse one in the same process.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from statprune_cli.config import ModelConfig
from statprune_cli.errors import InputError
from statprune_cli.load import load_model, load_model_config
from statprune_cli.ui import UI

MIN_CAPABILITY = (8, 0)
NEED = ("eval-speed needs a CUDA GPU of compute capability 8.0 or newer (Ampere or later), whose sparse tensor cores "
        "run 2:4 weights")
GROUP, KEPT = 4, 2
SEED = 0

Timer = Callable[[Callable[[], object]], float]  # runs the callable once and returns the seconds it took
T = TypeVar("T")


def device_problem() -> str | None:
    """Why this machine cannot run eval-speed, in one line, or None; asked before anything is loaded."""
    if not torch.cuda.is_available():
        build = f" (torch {torch.__version__} is built without CUDA)" if torch.version.cuda is None else ""
        return f"{NEED}; torch sees no CUDA device{build}"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return f"{NEED}; {torch.cuda.get_device_name()} has compute capability {major}.{minor}"
    return None


@dataclass(frozen=True)
class SpeedSettings:
    batch_sizes: tuple[int, ...] = (1, 16)
    seqlens: tuple[int, ...] = (512, 2048)
    decode_tokens: int = 64  # after a prompt of the shortest seqlen; 0: no decode measurement
    check_windows: int = 4  # windows of the shortest seqlen whose logits are compared
    rtol: float = 0.05  # on the relative L2 error of the logits
    warmup: int = 3
    repeats: int = 10


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """'1,16' -> (1, 16): positive integers, as given."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"{option}: expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return sizes


@dataclass(frozen=True)
class Backend:
    name: str
    min_shape: tuple[int, int]  # a converted weight's rows and columns must be multiples of these
    sparsify: Callable[[torch.Tensor], torch.Tensor]


def semi_structured_backend() -> Backend:
    """cuSPARSELt where torch has it (its CUDA wheels do), else CUTLASS, which ``to_sparse_semi_structured`` does not
    choose by itself; the shape limits are read from the backend's class, where torch keeps them per dtype."""
    from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                              SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured)

    cutlass = not torch.backends.cusparselt.is_available()
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    cls = SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT
    limits = cls._DTYPE_SHAPE_CONSTRAINTS[torch.bfloat16]
    return Backend(cls.BACKEND, (limits.sparse_min_rows, limits.sparse_min_cols), to_sparse_semi_structured)


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input weights (the columns) of a 2-D weight."""
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        return False
    return bool(((weight != 0).reshape(-1, GROUP).sum(-1) <= KEPT).all())


@dataclass
class Plan:
    linears: int
    two_four: list[str] = field(default_factory=list)
    convert: list[str] = field(default_factory=list)
    left_dense: dict[str, str] = field(default_factory=dict)  # 2:4 linears the kernels cannot take, and why


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def conversion_plan(weights: dict[str, torch.Tensor], min_shape: tuple[int, int]) -> Plan:
    """Which linears are 2:4, and which of those the backend's shape limits let it convert."""
    plan = Plan(linears=len(weights))
    rows_step, cols_step = min_shape
    for name, w in weights.items():
        if not is_two_four(w):
            continue
        plan.two_four.append(name)
        rows, cols = w.shape
        if rows % rows_step or cols % cols_step:
            plan.left_dense[name] = f"shape {rows}x{cols}: the kernels take multiples of {rows_step}x{cols_step}"
        else:
            plan.convert.append(name)
    return plan


@torch.no_grad()
def convert(model: nn.Module, names: Iterable[str], sparsify: Callable[[torch.Tensor], torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        lin.weight = nn.Parameter(sparsify(lin.weight.detach()), requires_grad=False)


def compare_logits(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], rtol: float) -> dict[str, Any]:
    """Dense against sparse logits over all windows: relative L2 error (the check), max |difference| and the share
    of positions whose top-1 token agrees (both for the reader). A non-finite error fails and is reported as null."""
    diff2 = ref2 = worst = 0.0
    agree = positions = windows = 0
    for dense, sparse in pairs:
        d, s = dense.float(), sparse.float()
        diff2 += float((s - d).square().sum())
        ref2 += float(d.square().sum())
        worst = max(worst, float((s - d).abs().max()))
        agree += int((s.argmax(-1) == d.argmax(-1)).sum())
        positions += d[..., 0].numel()
        windows += 1
    rel = math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf)
    ok = math.isfinite(rel) and rel <= rtol
    return {"windows": windows, "rel_l2": rel if math.isfinite(rel) else None,
            "max_abs_diff": worst if math.isfinite(worst) else None,
            "top1_agreement": agree / positions if positions else None, "rtol": rtol, "ok": ok}


def check_failure(check: dict[str, Any]) -> str | None:
    """The one line for a failed logits check, or None."""
    if check["ok"]:
        return None
    by = "a non-finite amount" if check["rel_l2"] is None else f"{check['rel_l2']:.3g}"
    return f"the sparse format's logits differ from the dense format's by {by} (relative L2), more than --rtol {check['rtol']:g}"


def median_seconds(step: Callable[[T], object], prepare: Callable[[], T], timer: Timer, warmup: int, repeats: int) -> float:
    """``step(prepare())`` ``warmup`` times untimed, then ``repeats`` times with only ``step`` timed; the median."""
    for _ in range(warmup):
        step(prepare())
    return statistics.median([timer(partial(step, prepare())) for _ in range(repeats)])


def cuda_timer(fn: Callable[[], object]) -> float:
    """CUDA events around ``fn``; the stream is drained first, so that work queued before (a decode's prompt) is not
    counted and ``fn``'s own launches are not hidden behind it."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def random_ids(shape: tuple[int, int], vocab: int, seed: int, device: str) -> torch.Tensor:
    """Token ids from a seeded generator: the same for the dense and the sparse format (speed and the logits do not
    need text)."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


def cache_name(model: nn.Module) -> str:
    """The KV cache's argument and output name: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The KV cache of ``ids`` and the greedy next token."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out[cache_name(model)], out.logits.argmax(-1)


def decode(model: nn.Module, tokens: int, state: tuple[Any, torch.Tensor]) -> None:
    cache, token = state
    name = cache_name(model)
    for _ in range(tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits.argmax(-1)


@dataclass
class Timings:
    prefill: dict[tuple[int, int], float]  # (batch, seqlen) -> seconds of one forward pass
    decode: float | None  # seconds for settings.decode_tokens tokens


@torch.no_grad()
def measure(model: nn.Module, settings: SpeedSettings, timer: Timer, vocab: int, device: str, ui: UI, label: str) -> Timings:
    """Median prefill seconds per (batch, seqlen) and decode seconds, on the same token ids for every format."""
    run = partial(median_seconds, timer=timer, warmup=settings.warmup, repeats=settings.repeats)
    times = {}
    for b in settings.batch_sizes:
        for s in settings.seqlens:
            ui.log(f"{label}: prefill, batch {b} x {s} tokens")
            ids = random_ids((b, s), vocab, SEED + 1, device)
            times[(b, s)] = run(partial(prefill, model), lambda ids=ids: ids)
    decode_s = None
    if settings.decode_tokens:
        ui.log(f"{label}: decode, {settings.decode_tokens} tokens")
        ids = random_ids((1, min(settings.seqlens)), vocab, SEED + 2, device)
        decode_s = run(partial(decode, model, settings.decode_tokens), partial(prompt, model, ids))
    return Timings(times, decode_s)


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def speed_results(dense: Timings, sparse: Timings, settings: SpeedSettings) -> dict[str, Any]:
    """The report's prefill rows (tokens/s) and decode row (ms per token); speedup > 1: the sparse format is faster."""
    rows = []
    for (b, s), d in dense.prefill.items():
        sp = sparse.prefill[(b, s)]
        rows.append({"batch": b, "seqlen": s, "dense_s": d, "sparse_s": sp, "dense_tokens_per_s": ratio(b * s, d),
                     "sparse_tokens_per_s": ratio(b * s, sp), "speedup": ratio(d, sp)})
    decode_row = None
    if dense.decode is not None and sparse.decode is not None:
        n = settings.decode_tokens
        decode_row = {"batch": 1, "prompt_tokens": min(settings.seqlens), "tokens": n,
                      "dense_ms_per_token": 1e3 * dense.decode / n, "sparse_ms_per_token": 1e3 * sparse.decode / n,
                      "speedup": ratio(dense.decode, sparse.decode)}
    return {"prefill": rows, "decode": decode_row}


def check_context(settings: SpeedSettings, context: int | None) -> None:
    """Every window must fit the model's context, decode's prompt and tokens included."""
    longest = max(max(settings.seqlens), min(settings.seqlens) + settings.decode_tokens)
    if context is not None and longest > context:
        raise InputError(f"--seqlens / --decode-tokens: {longest} tokens exceed the model's context ({context})")


def allocated_mib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None


def run_speed(path: Path, settings: SpeedSettings, ui: UI, device: str = "cuda", backend: Backend | None = None,
              timer: Timer = cuda_timer) -> dict[str, Any]:
    """Load in bfloat16, time the dense format, convert the 2:4 linears, check the logits, time the sparse format.

    ``device``, ``backend`` and ``timer`` are the GPU's unless given (a test runs the whole flow on the CPU)."""
    backend = backend or semi_structured_backend()
    mc = ModelConfig(name_or_path=str(path), dtype="bfloat16")
    check_context(settings, getattr(load_model_config(mc), "max_position_embeddings", None))
    ui.log(f"loading {path} in bfloat16 on {device}")
    model = load_model(mc).to(device)
    plan = conversion_plan(linear_weights(model), backend.min_shape)
    if not plan.convert:
        why = f" ({len(plan.left_dense)} are, in shapes the kernels cannot take)" if plan.two_four else ""
        raise InputError(f"PRUNED_DIR: none of the {plan.linears} linears of {path} can be converted: no weight is 2:4 "
                         f"in its stored column order{why}")
    vocab = model.config.vocab_size
    windows = random_ids((settings.check_windows, min(settings.seqlens)), vocab, SEED, device)
    with torch.no_grad():
        reference = [model(input_ids=w[None], use_cache=False).logits.cpu() for w in windows]
    dense = measure(model, settings, timer, vocab, device, ui, "dense")
    dense_mib = allocated_mib(device)
    ui.log(f"converting {len(plan.convert)} linears to the {backend.name} semi-structured format")
    convert(model, plan.convert, backend.sparsify)
    sparse_mib = allocated_mib(device)
    with torch.no_grad():
        check = compare_logits(((r, model(input_ids=w[None], use_cache=False).logits.cpu()) for r, w in zip(reference, windows)),
                               settings.rtol)
    sparse = measure(model, settings, timer, vocab, device, ui, "sparse")
    return {
        "model": str(path), "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "dtype": "bfloat16", "backend": backend.name, "torch": torch.__version__,
        "linears": {"total": plan.linears, "two_four": len(plan.two_four), "converted": len(plan.convert),
                    "left_dense": plan.left_dense},
        "allocated_mib": {"dense": dense_mib, "sparse": sparse_mib},
        "check": {**check, "seqlen": min(settings.seqlens)},
        "warmup": settings.warmup, "repeats": settings.repeats,
        **speed_results(dense, sparse, settings),
    }


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, dense, sparse, speedup) per prefill shape, then decode."""
    rows = [(f"prefill, batch {r['batch']} x {r['seqlen']}", fmt(r["dense_tokens_per_s"], ",.0f", " tok/s"),
             fmt(r["sparse_tokens_per_s"], ",.0f", " tok/s"), fmt(r["speedup"], ".2f", "x")) for r in report["prefill"]]
    if d := report["decode"]:
        rows.append((f"decode, batch 1, {d['tokens']} tokens after {d['prompt_tokens']}",
                     fmt(d["dense_ms_per_token"], ".2f", " ms/token"), fmt(d["sparse_ms_per_token"], ".2f", " ms/token"),
                     fmt(d["speedup"], ".2f", "x")))
    return rows


def print_speed(report: dict[str, Any], console: Console) -> None:
    """The timing table, then what was converted, the memory the weights took and the logits check."""
    table = Table(title=f"eval-speed: {escape(report['model'])} on {escape(report['device'])} ({report['dtype']}, "
                        f"median of {report['repeats']} after {report['warmup']} warm-up)")
    for col in ("measure", "dense", "2:4 sparse", "speedup"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    lin, mem, c = report["linears"], report["allocated_mib"], report["check"]
    console.print(f"converted {lin['converted']} of {lin['total']} linears "
                  f"({lin['two_four']} are 2:4) with {report['backend']}", markup=False)
    for name, why in lin["left_dense"].items():
        console.print(f"left dense: {name}: {why}", markup=False)
    if mem["dense"] is not None:
        console.print(f"GPU memory allocated: {mem['dense']:,.0f} MiB dense, {mem['sparse']:,.0f} MiB sparse", markup=False)
    verdict = "[green]ok[/green]" if c["ok"] else "[red]too far[/red]"
    console.print(f"logits, {c['windows']} windows x {c['seqlen']} tokens: relative L2 difference "
                  f"{fmt(c['rel_l2'], '.2e')} (rtol {c['rtol']:g}), max |difference| {fmt(c['max_abs_diff'], '.3g')}, "
                  f"same top-1 token {fmt(c['top1_agreement'], '.1%')}: {verdict}")
