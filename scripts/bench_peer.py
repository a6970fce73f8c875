"""Side by side with llm-compressor: its Wanda and SparseGPT against statprune's, same windows, same perplexity code.

1. Installs llm-compressor into its own virtual environment (.venv-peer, ignored by git; it pins
   other transformers versions, so it stays out of the project's dependencies): the CPU wheel
   torch==2.13.0 first (it lies on this machine's disk; a plain `torch` would pull a CUDA build),
   then llm-compressor, whose torch range (>=2.10,<=2.14) keeps that torch.
2. Draws statprune's calibration windows with statprune's own code (the benchmark protocol: C4
   sample, seed 0) and saves them as int64 input_ids, shape (nsamples, seqlen), in
   bench-out/peer/calib-*.safetensors.
3. Per method and setting: llm-compressor's `oneshot(..., pipeline="sequential")` with
   WandaPruningModifier or SparseGPTModifier in the peer venv (scripts/_peer_oneshot.py), fed
   those windows as a `datasets.Dataset` of input_ids (checked to reach the model verbatim, in
   order), saved as a plain dense HF folder and measured with `statprune eval-ppl`; then
   `statprune prune` with the same method, windows and evaluation. Both pruned folders are kept
   under bench-out/peer/ and compared mask by mask (share of llm-compressor's zeros that statprune
   also zeroes, per decoder layer).
4. Wall times: llm-compressor's is the `oneshot` call alone, timed inside the peer process;
   statprune's is its report's `timings.prune`. Both run in this one process tree, one after
   another, on the same machine.

Results accumulate in docs/results/data/peer.jsonl (a rerun with the same protocol skips what is there);
out/results/peer.md (peer-qwen.md for --model qwen) is written at the end. A statprune method that is
not registered yet is skipped with a message, and a later rerun fills its cells.

Usage: .venv/bin/python scripts/bench_peer.py [--model smollm2|qwen] [--methods wanda,sparsegpt]
                                             [--settings 50%,2:4] [--tools llmcompressor,statprune] [--nsamples 64]
                                             [--seqlen 512] [--max-tokens 65536] [--skip-install]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (BASE_CONFIG, DATA, MODELS, RESULTS, ROOT, append_jsonl, common_overrides, ensure_model, load_jsonl,  # noqa: E402
                   pattern_overrides, statprune, write_section)
from bench import cell_key, model_tag, tagged  # noqa: E402

PEER_VENV = ROOT / ".venv-peer"
PEER_PY = PEER_VENV / "bin" / "python"
PEER_SPEC = "llmcompressor==0.14.0.1"
TORCH_SPEC = "torch==2.13.0"
OUT = ROOT / "bench-out" / "peer"  # SmolLM2's cells; another model's in OUT / its bench.py tag
TOOLS = {"llmcompressor": "llm-compressor", "statprune": "statprune"}


def log(msg: str) -> None:
    print(f"[bench_peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the peer venv -----------------------------------------------------------------------------------------------

def ensure_peer_venv(spec: str) -> None:
    stamp = PEER_VENV / ".bench-peer-installed"
    want = f"{TORCH_SPEC}\n{spec}\n"
    if stamp.exists() and stamp.read_text() == want and PEER_PY.exists():
        return
    log(f"installing {spec} into {PEER_VENV.relative_to(ROOT)} ({TORCH_SPEC} first: the CPU wheel on this machine)")
    if not PEER_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH_SPEC], check=True)
    # torch is pinned again so pip keeps the CPU wheel instead of resolving its own
    subprocess.run(pip + [spec, TORCH_SPEC], check=True)
    stamp.write_text(want)


def peer_versions() -> dict[str, str]:
    code = ("import json; from importlib.metadata import version as v; print(json.dumps({p: v(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'torch', 'transformers')}))")
    return json.loads(subprocess.run([str(PEER_PY), "-c", code], check=True, capture_output=True, text=True).stdout)


# --- statprune's windows --------------------------------------------------------------------------------------------

def save_windows(model: Path, nsamples: int, seqlen: int, eval_tokens: int, out: Path) -> Path:
    """statprune's calibration windows for the benchmark config, by statprune's own code, as int64 input_ids."""
    import torch
    from safetensors.torch import load_file, save_file

    from statprune_cli.config import load_config
    from statprune_cli.load import load_tokenizer
    from statprune_cli.data import calibration_batches
    from statprune_cli.ui import UI

    path = out / f"calib-n{nsamples}-s{seqlen}-seed0.safetensors"
    if path.exists():
        return path
    cwd = os.getcwd()
    os.chdir(ROOT)  # the base config's data paths are relative to the repository root, as for `statprune prune`
    try:
        cfg = load_config(BASE_CONFIG, common_overrides(model, nsamples, seqlen, eval_tokens, "test"))
        batches, desc = calibration_batches(cfg, load_tokenizer(cfg.model), UI(quiet=True))
    finally:
        os.chdir(cwd)
    windows = torch.cat(batches).to(torch.int64).contiguous()
    assert windows.shape == (nsamples, seqlen), windows.shape
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    save_file({"input_ids": windows}, str(path), metadata={"description": desc, "sha256": digest,
                                                            "batch_size": str(cfg.calibration.batch_size)})
    assert torch.equal(load_file(str(path))["input_ids"], windows)
    log(f"windows: {desc} -> {path.relative_to(ROOT)} (sha256 {digest[:12]})")
    return path


# --- one cell per tool ------------------------------------------------------------------------------------------------

def tag(setting: str) -> str:
    return setting.replace("%", "pct").replace(":", "of")


def eval_ppl(folder: Path, seqlen: int, eval_tokens: int, batch_size: int) -> float:
    """`statprune eval-ppl` with the benchmark's protocol (as `_runs.dense_ppl`, at the prune runs' eval batch size)."""
    res = statprune("eval-ppl", str(folder), "--dataset", "wikitext2", "--data-files", str(DATA / "wikitext-2-raw"),
                    "--split", "test", "--seqlen", str(seqlen), "--max-tokens", str(eval_tokens),
                    "--batch-size", str(batch_size))
    return res[0]["perplexity"]


def run_llmcompressor(method: str, setting: str, model: Path, windows: Path, args: argparse.Namespace) -> dict:
    folder = args.out / f"llmcompressor-{method}-{tag(setting)}"
    result = args.out / f"llmcompressor-{method}-{tag(setting)}.json"
    cmd = [str(PEER_PY), str(ROOT / "scripts" / "_peer_oneshot.py"), "--model", str(model), "--windows", str(windows),
           "--method", method, "--setting", setting, "--out", str(folder), "--result", str(result),
           "--batch-size", str(args.batch_size), "--percdamp", str(args.percdamp), "--blocksize", str(args.blocksize)]
    logfile = args.out / f"llmcompressor-{method}-{tag(setting)}.log"
    with logfile.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {logfile}:\n"
                           + "\n".join(logfile.read_text().splitlines()[-30:]))
    r = json.loads(result.read_text())
    ppl = eval_ppl(folder, args.seqlen, args.max_tokens, args.batch_size)
    return {"ppl": ppl, "prune_s": r["oneshot_s"], "sparsity_linears": r["sparsity"]["linear_sparsity"],
            "windows_verbatim": r["windows_verbatim"], "pruned_linears": r["sparsity"]["pruned_linears"],
            "head_zeros": r["sparsity"]["head_zeros"], "options": r["modifier"], "versions": r["versions"],
            "folder": str(folder.relative_to(ROOT))}


def run_statprune(method: str, setting: str, model: Path, args: argparse.Namespace) -> dict:
    folder = args.out / f"statprune-{method}-{tag(setting)}"
    overrides = (common_overrides(model, args.nsamples, args.seqlen, args.max_tokens, "test")
                 + [f"pruning.method={method}"] + pattern_overrides(setting))
    r = statprune("prune", str(BASE_CONFIG), "--overwrite", "--output", str(folder),
                  *[a for o in overrides for a in ("--set", o)])
    return {"ppl": r["perplexity"][0]["perplexity"], "prune_s": r["timings"]["prune"],
            "peak_rss_mib": r["memory"]["peak_rss_mib"], "sparsity_linears": r["sparsity"]["pruned_linears"]["sparsity"],
            "options": r["options"], "calibration": r["calibration"]["description"],
            "versions": {k: r["versions"].get(k) for k in ("statprune", "torch", "transformers")},
            "folder": str(folder.relative_to(ROOT))}


def compare_masks(a: Path, b: Path) -> dict:
    """Per decoder layer: the share of ``a``'s zeros (llm-compressor) that ``b`` (statprune) also zeroes, and the
    relative difference of the two weight matrices."""
    import re

    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update({k: v for k, v in load_file(str(f)).items() if re.match(r"model\.layers\.\d+\..*\.weight$", k)
                        and v.dim() == 2})
        return out

    wa, wb = weights(a), weights(b)
    per_layer: dict[int, list[float]] = {}
    for k, x in wa.items():
        y = wb[k]
        za, zb = x == 0, y == 0
        i = int(k.split(".")[2])
        acc = per_layer.setdefault(i, [0, 0, 0.0, 0.0])
        acc[0] += int((za & zb).sum())
        acc[1] += int(za.sum())
        acc[2] += float(((x - y) ** 2).sum())
        acc[3] += float((x**2).sum())
    layers = sorted(per_layer)
    agree = [per_layer[i][0] / max(per_layer[i][1], 1) for i in layers]
    rel = [(per_layer[i][2] / max(per_layer[i][3], 1e-30)) ** 0.5 for i in layers]
    tot = [sum(per_layer[i][j] for i in layers) for j in range(4)]
    return {"mask_agreement": tot[0] / max(tot[1], 1), "mask_agreement_layer0": agree[0],
            "mask_agreement_per_layer": [round(v, 5) for v in agree], "weight_rel_diff": (tot[2] / tot[3]) ** 0.5,
            "weight_rel_diff_layer0": rel[0], "weight_rel_diff_per_layer": [round(v, 6) for v in rel]}


# --- the run ------------------------------------------------------------------------------------------------------------

def statprune_methods() -> list[str]:
    from statprune_cli.methods import METHODS

    return list(METHODS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=list(MODELS))
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--settings", default="50%,2:4")
    ap.add_argument("--tools", default="llmcompressor,statprune")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=4,
                    help="calibration and evaluation batch size of the llm-compressor side (the base config's, 4)")
    ap.add_argument("--percdamp", type=float, default=0.01, help="SparseGPTModifier dampening_frac (statprune's default)")
    ap.add_argument("--blocksize", type=int, default=128, help="SparseGPTModifier block_size (statprune's default)")
    ap.add_argument("--peer-spec", default=PEER_SPEC, help="the llm-compressor requirement installed into .venv-peer")
    ap.add_argument("--skip-install", action="store_true", help="use .venv-peer as it is")
    ap.add_argument("--results", type=Path, default=RESULTS / "peer.jsonl")
    args = ap.parse_args()
    methods, settings, tools = args.methods.split(","), args.settings.split(","), args.tools.split(",")

    if "llmcompressor" in tools and not args.skip_install:
        ensure_peer_venv(args.peer_spec)
    model = ensure_model(args.model)
    args.out = OUT / model_tag(args)  # OUT itself for SmolLM2, whose tag is empty
    windows = save_windows(model, args.nsamples, args.seqlen, args.max_tokens, args.out)
    key = cell_key(args, seed=0)  # bench.py's key for the same model and windows
    done = {(r["key"], r["tool"], r["method"], r["setting"]) for r in load_jsonl(args.results)}

    if (key, "dense", "dense", "-") not in done:
        append_jsonl(args.results, {"key": key, "tool": "dense", "method": "dense", "setting": "-",
                                    "ppl": eval_ppl(model, args.seqlen, args.max_tokens, args.batch_size)})
    registered = statprune_methods()
    for setting in settings:
        for method in methods:
            for tool in tools:
                if (key, tool, method, setting) in done:
                    continue
                if tool == "statprune" and method not in registered:
                    log(f"statprune has no method {method!r} yet (registered: {', '.join(registered)}): skipped; rerun later")
                    continue
                log(f"{TOOLS[tool]} {method} {setting} ...")
                load0 = os.getloadavg()[0]
                rec = (run_llmcompressor(method, setting, model, windows, args) if tool == "llmcompressor"
                       else run_statprune(method, setting, model, args))
                # the 1-minute load average before and after: above ~2 on this 2-core machine, other processes
                # shared the cores and the wall time is inflated
                rec = {"key": key, "tool": tool, "method": method, "setting": setting, **rec,
                       "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
                append_jsonl(args.results, rec)
                log(f"{TOOLS[tool]:>14} {method:<10} {setting:>4}  ppl {rec['ppl']:9.3f}  prune {rec['prune_s']:6.1f}s")
            folders = [args.out / f"{t}-{method}-{tag(setting)}" for t in ("llmcompressor", "statprune")]
            if (key, "compare", method, setting) not in done and all((f / "config.json").exists() for f in folders):
                rec = {"key": key, "tool": "compare", "method": method, "setting": setting,
                       **compare_masks(*folders)}
                append_jsonl(args.results, rec)
                log(f"masks {method} {setting}: {rec['mask_agreement']:.4f} of llm-compressor's zeros shared "
                    f"(layer 0: {rec['mask_agreement_layer0']:.4f}); weight rel. diff {rec['weight_rel_diff']:.4f}")
    write_doc(args, key, methods, settings)


# --- the doc -----------------------------------------------------------------------------------------------------------

NOTES = """\
Set-up details that matter for a like-for-like run. llm-compressor's default `targets=["Linear"]`
also matches `lm_head` (it only warns), which would prune the head and, tied, the embedding: the
benchmark ignores it with `re:.*lm_head` (an exact `lm_head` does not match, as its module names
carry a trailing dot). With `shuffle_calibration_samples=False` its LengthAwareSampler orders
samples by an unstable `torch.argsort` of their lengths, which permutes 64 equal-length windows
(48, 33, 34, ..., 16, 1, 2, ...); the peer script makes that sort stable so the windows arrive in
statprune's order, and a hook on the embedding checks that they do (with the default shuffle they
would arrive in random order: the same set, in other batches).

How llm-compressor computes the two methods (read from its source, see the report of this benchmark):
its Wanda keeps a running mean over calibration *windows* of each input channel's squared L2 norm in
float32 (the same ranking as Wanda's ||X_j||_2, which is a constant factor away) and compares scores
within each output row (stable sort) or within each group of M (topk); its SparseGPT accumulates
H = 2/n X X^T in float32 as a running average over windows, dampens by dampening_frac x mean(diag H),
sets dead channels (diag 0) to 1 and zeroes their weights, takes the upper Cholesky factor of H^-1,
and in each block of block_size columns prunes the entries with w^2/[H^-1]_qq^2 <= the block
matrix's int(numel x sparsity)-th smallest value (over the whole rows x block matrix, not per row),
or per group of M columns chosen when the group's first column is reached, after the updates
from the earlier columns of the block. Both see every token (no position skipped, no padding here),
run decoder layer by decoder layer, collect all linears of a layer on the same inputs (the outputs
of the already-pruned layers, with the current layer still dense), prune them, then rerun the layer
to pass its pruned outputs on. Its calibration forward passes use eager attention (statprune: the
model's default, sdpa), a numerical difference of float32 rounding size.
"""

# The reading of SmolLM2's cells, written by hand: it goes under that model's tables only
MEASURED_SMOLLM2 = """\
Measured. Every cell agrees within 1% (largest: SparseGPT 50%, statprune 0.8% lower).
- Wanda at 50% and 2:4: the masks of the first layers are identical bit for bit and the share of
  common zeros falls smoothly to 99.7% by the last layer: the same formula, and only
  float32-rounding-size differences in the activations (eager vs sdpa attention, float32 running
  mean vs float64 sums) that grow as each layer is calibrated on the previous pruned layers' outputs.
- SparseGPT at 50%: layer 0 shares 99.98% of the zeros, not 100%: llm-compressor prunes every entry
  at or below the block's int(numel x sparsity)-th smallest saliency (one more per block, and ties),
  statprune exactly int(numel x sparsity) per block (see the method's notes). Pruning slightly more
  is consistent with its slightly higher perplexity (65.09 vs 64.57). Further down, the shares fall
  to 98.8% overall: SparseGPT's update feeds each difference into the remaining columns.
- SparseGPT at 2:4: layer 0 identical (an N:M group has no tie rule to differ on); 94.8% of the
  zeros shared and the weights 20% apart overall, yet the perplexities within 0.15%. The inverse
  Hessian amplifies the small differences in each layer's inputs into different but equally good
  reconstructions.
- Wall time, one tool after the other on the otherwise idle machine (load about 2): statprune takes
  0.76-0.80x llm-compressor's time for the same method (the Wanda 50% pair ran in an earlier,
  contended run: its 0.70x is not comparable).
"""


def write_doc(args: argparse.Namespace, key: str, methods: list[str], settings: list[str]) -> None:
    rows = [r for r in load_jsonl(args.results) if r["key"] == key]
    by = {(r["tool"], r["method"], r["setting"]): r for r in rows}
    dense = by.get(("dense", "dense", "-"))
    cmd = (f"python scripts/bench_peer.py --model {args.model} --methods {args.methods} --settings {args.settings} --nsamples {args.nsamples} "
           f"--seqlen {args.seqlen} --max-tokens {args.max_tokens}")
    peer = next((r["versions"] for r in rows if r["tool"] == "llmcompressor"), {})
    ours = next((r["versions"] for r in rows if r["tool"] == "statprune"), {})
    layers = json.loads((MODELS[args.model].folder / "config.json").read_text())["num_hidden_layers"]
    out = [
        f"## Side by side with llm-compressor ({MODELS[args.model].label})",
        "",
        f"Made by `{cmd}` on 2 CPU cores, float32, one tool after the other in one run. Both tools prune every linear of "
        f"the {layers} decoder layers (the head stays dense) on the same {args.nsamples} windows x {args.seqlen} tokens "
        f"of the C4 sample (statprune's windows, seed 0, passed to llm-compressor as a `datasets.Dataset` of input_ids "
        f"and checked to reach its model verbatim and in order), sequentially (`oneshot(..., pipeline=\"sequential\")`). "
        f"Both are measured by statprune's perplexity code: first {args.max_tokens} tokens of the WikiText-2 test split, "
        f"seqlen {args.seqlen}. Wall time: llm-compressor's `oneshot` call, timed in its process (model loading and "
        "saving excluded); statprune's `timings.prune` of its report (the same span: layer-wise calibration and pruning).",
        "",
        f"llm-compressor {peer.get('llmcompressor', '?')} (compressed-tensors {peer.get('compressed-tensors', '?')}, "
        f"transformers {peer.get('transformers', '?')}, torch {peer.get('torch', '?')}) in its own venv; statprune "
        f"{ours.get('statprune', '?')} (transformers {ours.get('transformers', '?')}, torch {ours.get('torch', '?')}). "
        f"SparseGPT on both sides: dampening {args.percdamp}, block size {args.blocksize}.",
        "",
        "| tool | method | " + " | ".join(f"{s} ppl | {s} time" for s in settings) + " |",
        "|---|---|" + "---:|---:|" * len(settings),
    ]
    if dense:
        out.append("| dense | - | " + " | ".join(f"{dense['ppl']:.2f} | -" for _ in settings) + " |")
    for m in methods:
        for t in ("llmcompressor", "statprune"):
            cells = []
            for s in settings:
                r = by.get((t, m, s))
                load = f" (load {max(r['loadavg']):.1f})" if r and r.get("loadavg") else ""
                cells.append(f"{r['ppl']:.2f} | {r['prune_s']:.1f} s{load}" if r else "not run | ")
            out.append(f"| {TOOLS[t]} | {m} | " + " | ".join(cells) + " |")
    out += ["", "Load: the higher of the 1-minute load averages before and after the cell. This machine has 2 cores; "
            "above 2, other processes shared them and the wall time is inflated by about load/2, so wall times "
            "compare only between cells at similar load."]
    out += ["", "statprune vs llm-compressor (relative perplexity difference, (statprune - llm-compressor) / "
            "llm-compressor; target: within 1%), wall-time ratio, and the masks: share of llm-compressor's zeros that "
            "statprune also zeroes (all layers / layer 0, whose inputs are the same in both tools) and the relative "
            "difference of the pruned weights, ||W_statprune - W_llmc|| / ||W_llmc||.", "",
            "| method | setting | ppl difference | within 1% | time ratio | masks shared (all / layer 0) | weight difference |",
            "|---|---|---:|:---:|---:|---:|---:|"]
    for m in methods:
        for s in settings:
            a, b, c = by.get(("llmcompressor", m, s)), by.get(("statprune", m, s)), by.get(("compare", m, s))
            if not (a and b):
                out.append(f"| {m} | {s} | not run | | | | |")
                continue
            d = (b["ppl"] - a["ppl"]) / a["ppl"]
            masks = f"{c['mask_agreement']:.2%} / {c['mask_agreement_layer0']:.2%}" if c else ""
            wd = f"{c['weight_rel_diff']:.2%}" if c else ""
            out.append(f"| {m} | {s} | {d:+.2%} | {'yes' if abs(d) <= 0.01 else '**no**'} | "
                       f"{b['prune_s'] / a['prune_s']:.2f}x | {masks} | {wd} |")
    out += ["", NOTES] + (["", MEASURED_SMOLLM2] if args.model == "smollm2" else [])
    write_section(tagged("peer", args), "\n".join(out) + "\n")
    log("peer tables written")


if __name__ == "__main__":
    main()
