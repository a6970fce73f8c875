"""Shared by the benchmark scripts: run `statprune` as a subprocess per setting and collect its JSON report.

One subprocess per prune gives each run its own peak RSS, and the exact CLI a user runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from statprune_cli.sweep_grid import parse_method

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BASE_CONFIG = ROOT / "configs" / "smollm2-135m-statprune-50.yaml"
# Each measured cell, committed with the docs it makes: a fresh clone can rewrite every table (--doc-only), and a
# rerun skips what is there. Pruned checkpoints and other large outputs stay in the ignored bench-out/.
RESULTS = ROOT / "docs" / "results" / "data"


@dataclass(frozen=True)
class BenchModel:
    """A real model the benchmarks run on: its name in tables, its dense float32 folder, the script that writes it."""

    label: str
    folder: Path
    make: tuple[str, ...]


MODELS = {
    "smollm2": BenchModel("SmolLM2-135M", ROOT / "models" / "smollm2-135m-hf",
                          ("demo_model.py", str(ROOT / "models" / "smollm2-135m"), "--hf", str(ROOT / "models" / "smollm2-135m-hf"))),
    # a second family (Qwen2: grouped-query attention, q/k/v biases); about 4x SmolLM2's time per prune on 2 cores
    "qwen": BenchModel("Qwen2.5-Coder-0.5B-Instruct", ROOT / "models" / "qwen2.5-coder-0.5b-hf",
                       ("qwen_model.py", str(ROOT / "models" / "qwen2.5-coder-0.5b-hf"), "--gguf-dir", str(ROOT / "models"))),
}


def ensure_model(name: str = "smollm2") -> Path:
    m = MODELS[name]
    if not (m.folder / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / m.make[0]), *m.make[1:]], check=True)
    return m.folder


def synthetic_llama(path: Path, hidden: int, intermediate: int, layers: int, tokenizer_from: Path, heads: int = 32) -> Path:
    """A random-weight Llama checkpoint (float32 safetensors, with a real tokenizer), written once.

    Cost and memory do not depend on the values, so this stands in for a checkpoint of that shape.
    """
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


def statprune(*args: str, launcher: tuple[str, ...] = (), experimental: bool = False) -> dict | list:
    """Run the CLI with --json and return the parsed report; raise with its stderr on failure.

    ``launcher``: arguments between the interpreter and ``-m statprune_cli``, e.g. ``("-m", "torch.distributed.run", ...)``.
    ``experimental``: run it through scripts/experimental.py, which registers the experimental methods first.
    """
    entry = [str(Path(__file__).resolve().parent / "experimental.py")] if experimental else ["-m", "statprune_cli"]
    cmd = [sys.executable, *launcher, *entry, *args, "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def prune(overrides: list[str], out: Path) -> dict:
    """One fresh prune into ``out`` (removed afterwards); a streaming run's leftover partial folder is cleared first."""
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        methods = [o.split("=", 1)[1] for o in overrides if o.startswith("pruning.method=")]
        return statprune("prune", str(BASE_CONFIG), "--overwrite", "--output", str(out),
                         *[a for o in overrides for a in ("--set", o)],
                         experimental=any(m in experimental_methods() for m in methods))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)


def experimental_methods() -> set[str]:
    """The method names scripts/experimental.py registers (read only: this process's registry stays the product's)."""
    from experimental import EXPERIMENTAL

    return set(EXPERIMENTAL)


def pattern_overrides(setting: str) -> list[str]:
    """'50%' -> unstructured 0.5; '2:4' -> N:M."""
    if setting.endswith("%"):
        return [f"pruning.sparsity={float(setting[:-1]) / 100}", "pruning.pattern=unstructured"]
    return [f"pruning.pattern={setting}"]


def method_overrides(name: str) -> list[str]:
    """A --methods entry as ``--set`` flags, with the suffixes of ``statprune sweep --methods`` ('wanda+owl(m=7)',
    'ria+realloc'; ``statprune_cli.sweep_grid.parse_method``); without ``+owl`` the profile is uniform."""
    from experimental import register

    register()  # a benchmark's method list may name experimental methods
    _, overrides = parse_method(name)
    owl = overrides.pop("owl", {})
    flags = {"profile": "uniform", **overrides, **{f"owl.{k}": v for k, v in owl.items()}}
    return [f"pruning.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()]


def common_overrides(model: Path, nsamples: int, seqlen: int, eval_tokens: int, split: str) -> list[str]:
    """The protocol shared by the benchmarks: C4-sample calibration, WikiText-2 perplexity of ``split``."""
    wiki = DATA / "wikitext-2-raw"
    return [f"model.name_or_path={model}", "model.gguf_file=null", f"calibration.nsamples={nsamples}",
            f"calibration.seqlen={seqlen}", f"eval.seqlen={seqlen}", f"eval.max_tokens={eval_tokens}",
            f"eval.datasets=[{{dataset: wikitext2, data_files: '{wiki}', split: {split}}}]"]


def dense_ppl(model: Path, seqlen: int, eval_tokens: int, split: str) -> float:
    res = statprune("eval-ppl", str(model), "--dataset", "wikitext2", "--data-files", str(DATA / "wikitext-2-raw"),
                    "--split", split, "--seqlen", str(seqlen), "--max-tokens", str(eval_tokens))
    return res[0]["perplexity"]


DRAFTS = ROOT / "out" / "results"


def write_section(name: str, markdown: str) -> None:
    """Write one script's tables to out/results/NAME.md. docs/results.md is curated (current tables only, each with
    its command), so a script never rewrites it: its figures are copied from this draft by hand."""
    DRAFTS.mkdir(parents=True, exist_ok=True)
    (DRAFTS / f"{name}.md").write_text(markdown)
    print(f"wrote {(DRAFTS / f'{name}.md').relative_to(ROOT)}; docs/results.md takes its figures by hand", flush=True)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def commit() -> str:
    """The checkout's commit, recorded with each cell so a table can say which code made it."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or "unknown"


def run_grid(results: Path, key: str, label: str, cells: dict[tuple[str, str], list[str]], model: Path, seqlen: int,
             eval_tokens: int, split: str, dense: Callable[[], dict[str, float]] | None = None) -> None:
    """The dense perplexity, then one `statprune prune` per (name, setting) cell not yet in ``results``.

    ``dense``: gives the dense perplexities by data set name, first one first, where the cells evaluate more than
    WikiText-2. Each cell records every data set's perplexity under ``ppls``, and its first under ``ppl``.
    """
    done = {(r["key"], r[label], r["setting"]) for r in load_jsonl(results)}
    if (key, "dense", "-") not in done:
        ppls = dense() if dense else {f"wikitext2[{split}]": dense_ppl(model, seqlen, eval_tokens, split)}
        append_jsonl(results, {"key": key, label: "dense", "setting": "-", "ppl": next(iter(ppls.values())), "ppls": ppls})
    for (name, setting), overrides in cells.items():
        if (key, name, setting) in done:
            continue
        r = prune(overrides, ROOT / "bench-out" / f"{label}-tmp")
        rec = {"key": key, label: name, "setting": setting, "ppl": r["perplexity"][0]["perplexity"],
               "prune_s": r["timings"]["prune"], "peak_rss_mib": r["memory"]["peak_rss_mib"],
               "sparsity_linears": r["sparsity"]["pruned_linears"]["sparsity"],
               "sparsity_all": r["sparsity"]["all_parameters"]["sparsity"], "options": r["options"], "mode": r["mode"].split(":")[0],
               "commit": commit(), "ppls": {p["dataset"]: p["perplexity"] for p in r["perplexity"]}}
        append_jsonl(results, rec)
        print(f"{setting:>5} {name:<28} ppl {rec['ppl']:9.3f}  prune {rec['prune_s']:6.1f}s  RSS {rec['peak_rss_mib']:.0f} MiB",
              flush=True)
