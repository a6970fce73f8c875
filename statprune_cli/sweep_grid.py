"""The sweep's grid: a cell per (method, setting) parsed from ``--methods`` and ``--sparsities`` and validated
before anything loads, and the outputs' table and plot. ``commands/sweep.py`` runs the cells."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from statprune_cli.config import Config, validate
from statprune_cli.errors import ConfigError, InputError
from statprune_cli.methods import METHODS
from statprune_cli.methods.statprune import SKETCH_RANK
from statprune_cli.schema import build


@dataclass
class Cell:
    method: str  # as given in --methods, with its suffixes ("wanda+owl")
    setting: str
    cfg: Config
    perplexity: list[float] = field(default_factory=list)
    prune_seconds: float | None = None
    sparsity: float | None = None
    zeroshot_mean: float | None = None
    error: str | None = None
    not_applicable: str | None = None  # the method's suffix does not apply to this setting (owl at 2:4): not run
    shared_stats: bool = False  # used the dense statistics the cells share (their pass is not in prune_seconds)
    layer_sparsity: list[float] | None = None  # each decoder layer's target where OWL set one

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "setting": self.setting, "perplexity": self.perplexity,
                "prune_seconds": self.prune_seconds, "shared_dense_statistics": self.shared_stats,
                "sparsity": self.sparsity, "zeroshot_mean_acc": self.zeroshot_mean, "error": self.error,
                "not_applicable": self.not_applicable, "layer_target_sparsity": self.layer_sparsity}


SUFFIXES = ("+owl, +owl(key=value;...), +realloc, +realloc(absorbed), +realloc(off), +resperm, +resperm(off), +lsa, "
            "+lsa(off), +alloc, +alloc(off), +onepass, +onepass(off), +sketch, +sketch(key=value;...), +sketch(off), "
            "+paper, +row or +matrix")
SKETCH_KEYS = ("rank", "every")  # +sketch(every=4): pruning.options.sketch_every
REALLOC_SUFFIXES: dict[str, bool | str] = {"realloc": True, "realloc(absorbed)": "absorbed", "realloc(off)": False}
# keys valid for some patterns only: n/a cells elsewhere
PATTERN_BOUND = ("pruning.profile", "pruning.reallocation", "pruning.residual_permutation", "pruning.lsa", "pruning.allocation")


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """A --methods entry -> (method, pruning overrides). 'wanda': that method as configured; '+owl' adds the OWL
    layer profile, '+owl(m=7;lam=0.04)' with those ``pruning.owl`` keys; '+realloc' adds N:M channel
    reallocation, '+realloc(absorbed)' only where the model absorbs it, '+realloc(off)' none (statprune has it at N:M);
    '+resperm' permutes the residual stream for its readers' N:M groups (``pruning.residual_permutation``),
    '+resperm(off)' does not (statprune does at N:M); '+lsa' refines the reallocation orders by linear sum assignment
    (``pruning.lsa``), '+lsa(off)' does not (statprune does at N:M); '+alloc' spreads each layer's unstructured
    sparsity over its linears by lost energy (``pruning.allocation: energy``), '+alloc(off)' keeps it uniform; '+onepass'
    calibrates every layer on the dense model's activations (``pruning.sequential: false``), '+onepass(off)' on the
    pruned layers' outputs; statprune's '+sketch' updates the kept weights from a sketch of the input Hessian before
    its energy restoration (``pruning.options.sketch_rank``), '+sketch(every=4;rank=128)' with those
    ``pruning.options.sketch_*`` keys, '+sketch(off)' only restores the energy; '+paper' is statprune's paper preset
    (``pruning.options.preset: paper``);
    '+row' / '+matrix' compare unstructured scores within each row / over the whole matrix (``pruning.granularity``)."""
    method, *extras = text.strip().split("+")
    if method not in METHODS:
        raise ConfigError("--methods", f"unknown method {method!r} in {text!r}; expected some of {', '.join(sorted(METHODS))}")
    overrides: dict[str, Any] = {"method": method}
    for extra in extras:
        flag, paren, keys = extra.partition("(")
        if flag == "owl" and (not paren or keys.endswith(")")):
            overrides["profile"] = "owl"
            overrides["owl"] = key_values(keys[:-1], "+owl", text)
        elif extra in REALLOC_SUFFIXES:
            overrides["reallocation"] = REALLOC_SUFFIXES[extra]
        elif extra in ("resperm", "resperm(off)"):
            overrides["residual_permutation"] = extra == "resperm"
        elif extra in ("lsa", "lsa(off)"):
            overrides["lsa"] = extra == "lsa"
        elif extra in ("alloc", "alloc(off)"):
            overrides["allocation"] = "energy" if extra == "alloc" else "uniform"
        elif extra in ("onepass", "onepass(off)"):
            overrides["sequential"] = extra == "onepass(off)"
        elif extra in ("row", "matrix"):
            overrides["granularity"] = extra
        elif extra in ("sketch", "sketch(off)"):
            overrides.setdefault("options", {})["sketch_rank"] = SKETCH_RANK if extra == "sketch" else 0
        elif extra == "paper":
            overrides.setdefault("options", {})["preset"] = "paper"
        elif flag == "sketch" and keys.endswith(")") and keys != "off)":
            given = key_values(keys[:-1], "+sketch", text)
            if unknown := sorted(set(given) - set(SKETCH_KEYS)):
                raise ConfigError("--methods", f"unknown key {unknown[0]!r} inside +sketch(...) of {text!r}; "
                                  f"expected some of {', '.join(SKETCH_KEYS)}")
            overrides.setdefault("options", {}).update({"sketch_rank": SKETCH_RANK, **{f"sketch_{k}": v for k, v in given.items()}})
        else:
            raise ConfigError("--methods", f"unknown suffix +{extra} in {text!r}; expected {SUFFIXES}")
    return method, overrides


def key_values(text: str, suffix: str, entry: str) -> dict[str, Any]:
    """'m=7;lam=0.04' -> {'m': 7, 'lam': 0.04} (YAML values), for the suffixes that take keys."""
    out = {}
    for kv in filter(None, text.split(";")):
        key, eq, value = kv.partition("=")
        if not eq:
            raise ConfigError("--methods", f"expected key=value inside {suffix}(...) of {entry!r}, got {kv!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``0.5`` or ``50%`` -> unstructured sparsity; ``2:4`` -> that pattern. Returns (label, pruning overrides)."""
    t = text.strip()
    if ":" in t:
        return t, {"pattern": t}
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ConfigError("--sparsities", f"expected a sparsity such as 0.5 or 50% or a pattern such as 2:4, got {t!r}") from None
    return f"{value:.0%}", {"pattern": "unstructured", "sparsity": value}


def plan_cells(cfg: Config, methods: list[str], settings: list[str]) -> list[Cell]:
    """One validated config per (method, setting): every bad name fails here, before anything loads. A combination
    that one setting cannot take (OWL with an N:M pattern, reallocation with unstructured sparsity) is marked not
    applicable there; a method that no setting can take is an error."""
    if not methods or not settings:
        raise InputError("--methods and --sparsities: expected at least one of each")
    if not cfg.eval.datasets:
        raise ConfigError("eval.datasets", "the sweep compares perplexities: give at least one evaluation data set")
    parsed = {m: parse_method(m) for m in methods}
    cells, refused = [], {m: [] for m in methods}
    for setting in settings:
        label, pattern = parse_setting(setting)
        for m in methods:
            method, overrides = parsed[m]
            data = cfg.to_dict()
            if method != cfg.pruning.method:
                data["pruning"]["options"] = {}  # options belong to the config's own method
            data["pruning"].update(pattern, **{k: v for k, v in overrides.items() if k not in ("owl", "options")})
            data["pruning"]["owl"].update(overrides.get("owl", {}))
            data["pruning"]["options"].update(overrides.get("options", {}))
            cell_cfg = build(Config, data, "")
            cell = Cell(m, label, cell_cfg)
            try:
                validate(cell_cfg)
            except ConfigError as e:
                if e.key not in PATTERN_BOUND:
                    raise
                refused[m].append(e)
                cell.not_applicable = str(e)
            cells.append(cell)
    for m, errors in refused.items():
        if len(errors) == len(settings):
            raise errors[0]
    return cells


def sweep_table(result: dict[str, Any]) -> str:
    """Markdown: rows methods, columns settings; each cell 'perplexity (prune seconds)' on the first data set."""
    settings, by = result["settings"], {(c["method"], c["setting"]): c for c in result["cells"]}

    def cell(c: dict[str, Any]) -> str:
        if c["not_applicable"]:
            return "n/a"
        if c["error"]:
            return f"failed: {c['error'].splitlines()[0][:80]}"
        acc = f", acc {100 * c['zeroshot_mean_acc']:.1f}%" if c.get("zeroshot_mean_acc") is not None else ""
        shared = "*" if c["shared_dense_statistics"] else ""
        return f"{c['perplexity'][0]:.2f} ({c['prune_seconds']:.1f} s{shared}{acc})"

    dense_acc = result.get("dense_zeroshot_mean_acc")
    acc = f", mean zero-shot accuracy {100 * dense_acc:.1f}%" if dense_acc is not None else ""
    lines = [f"Perplexity on {result['datasets'][0]} (prune wall time{', mean zero-shot acc' if acc else ''}); dense "
             f"{result['dense'][0]:.2f}{acc}. Calibration: {result['calibration']}.", "",
             "| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for m in result["methods"]:
        lines.append(f"| {m} | " + " | ".join(cell(by[(m, s)]) for s in settings) + " |")
    if any(c["not_applicable"] for c in result["cells"]):
        lines += ["", "n/a: the method's suffix does not apply to that setting (OWL and +alloc spread an unstructured sparsity; "
                      "channel reallocation and the residual permutation are for N:M patterns)."]
    if any(c["shared_dense_statistics"] for c in result["cells"]):
        lines += ["", "\\* used dense-model statistics (for the masks, OWL's layer ratios or the residual order) "
                      f"collected once for every such cell: {result['shared_dense_seconds']:.1f} s, not in the cells' "
                      "times; run alone, such a cell collects them itself."]
    return "\n".join(lines) + "\n"


def plot_segments(result: dict[str, Any]) -> list[tuple[str, list[int], list[float]]]:
    """(method, x positions, perplexities) per line: unstructured sparsities and N:M patterns are not joined,
    as a line between 70% and 2:4 would suggest a trend that does not exist."""
    settings, out = result["settings"], []
    for m in result["methods"]:
        cells = {c["setting"]: c for c in result["cells"] if c["method"] == m and not (c["error"] or c.get("not_applicable"))}
        for nm in (False, True):
            xs = [i for i, s in enumerate(settings) if s in cells and (":" in s) == nm]
            if xs:
                out.append((m, xs, [cells[settings[i]]["perplexity"][0] for i in xs]))
    return out


def write_plot(result: dict[str, Any], path: Path) -> str | None:
    """sweep.png if matplotlib is installed (``pip install 'statprune[plot]'``); the table does not need it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw_plot(result, plt)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": a legend beside the axes stays in the image
    plt.close(fig)
    return str(path.name)


def draw_plot(result: dict[str, Any], plt: Any) -> Any:
    """Perplexity against sparsity, one line per method, log scale, dense as a dashed line. With one setting, one
    bar per method instead: lines would stack every method's point on one x position, told apart by colour only.
    ``plt``: matplotlib.pyplot, which the caller imports (an optional dependency)."""
    settings, dense, segments = result["settings"], result["dense"][0], plot_segments(result)
    label = f"perplexity ({result['datasets'][0]})"
    title = f"{Path(result['model']).name}: perplexity by method"
    if len(settings) == 1:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * max(1, len(segments))))
        names, values = [m for m, _, _ in segments], [ys[0] for _, _, ys in segments]
        ax.set_xscale("log")
        bars = ax.barh(range(len(names)), values, color="tab:blue")
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.2f}", padding=3, fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.axvline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel(f"{label} at {settings[0]}")
        ax.set_title(title)
        ax.legend(loc="lower right")
        return fig
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, str] = {}
    for m, xs, ys in segments:
        (line,) = ax.plot(xs, ys, marker="o", color=colours.get(m), label=None if m in colours else m)
        colours[m] = line.get_color()
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(label)
    ax.set_title(f"{title} and sparsity")
    if len(colours) > 8:  # a legend this long would cover the lines
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend()
    return fig
