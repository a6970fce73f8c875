"""Record, and compare, a sha256 of every tensor that `statprune prune` writes: a refactor that claims "same numbers"
proves it with this.

    python scripts/tensor_hashes.py record FILE.json [--only tiny|smollm2]
    python scripts/tensor_hashes.py compare BEFORE.json AFTER.json

Each run goes through the CLI a user runs (`python -m statprune_cli prune`), so the script serves any internal design.
Cells: every method's default (magnitude, wanda, sparsegpt, ria, statprune) at 50% and 2:4, on SmolLM2-135M
(16 C4 windows x 512 tokens) and on a tiny random model of each architecture the tests prune through the CLI
(llama, mistral, gemma3, opt). No evaluation: only the written tensors count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

METHODS = ("magnitude", "wanda", "sparsegpt", "ria", "statprune")
SETTINGS = {"50%": ["pruning.sparsity=0.5", "pruning.pattern=unstructured"], "2:4": ["pruning.pattern=2:4"]}
# qwen2 is left out: transformers maps a Qwen2 folder's tokenizer to Qwen2Tokenizer, which reads the tests' word-level
# tokenizer as empty, so the CLI cannot calibrate it (the tests run the qwen2 model through the engine directly)
ARCHS = ("llama", "mistral", "gemma3", "opt")


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (with its dtype and shape) in every safetensors file of ``folder``."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                out[f"{f.name}:{name}"] = h.hexdigest()
    return out


def prune(config: Path, overrides: list[str], out: Path) -> dict[str, str]:
    cmd = [sys.executable, "-m", "statprune_cli", "prune", str(config), "--overwrite", "--output", str(out), "--quiet",
           *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    try:
        return folder_hashes(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def smollm2_cells(work: Path) -> dict[str, dict[str, str]]:
    from _runs import BASE_CONFIG, DATA, ensure_model

    model = ensure_model()
    common = [f"model.name_or_path={model}", "model.gguf_file=null", "calibration.nsamples=16", "calibration.seqlen=512",
              f"calibration.data_files={DATA / 'c4' / 'c4-train.00000-of-01024.first1000.jsonl'}", "eval.datasets=[]"]
    cells = {}
    for method in METHODS:
        for setting, flags in SETTINGS.items():
            cells[f"smollm2/{method}/{setting}"] = prune(BASE_CONFIG, [*common, f"pruning.method={method}", *flags],
                                                          work / "out")
            print(f"smollm2 {method} {setting}", flush=True)
    return cells


def tiny_cells(work: Path) -> dict[str, dict[str, str]]:
    from conftest import random_text, tiny_model, tiny_tokenizer, write_config

    cal, ev = work / "cal.jsonl", work / "eval.txt"
    cal.write_text("".join(json.dumps({"text": random_text(300, seed=i)}) + "\n" for i in range(20)))
    ev.write_text(random_text(2000, seed=99))
    cells = {}
    for arch in ARCHS:
        model_dir = work / f"tiny-{arch}"
        tiny_model(arch).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        config = write_config(work / "run.yaml", model_dir, {"cal": cal, "eval": ev}, work / "out", eval={"datasets": []})
        for method in METHODS:
            for setting, flags in SETTINGS.items():
                cells[f"tiny-{arch}/{method}/{setting}"] = prune(config, [f"pruning.method={method}", *flags], work / "out")
        print(f"tiny {arch}", flush=True)
    return cells


def record(path: Path, only: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="tensor-hashes-", dir=ROOT) as tmp:
        cells = {}
        if only in (None, "tiny"):
            cells.update(tiny_cells(Path(tmp)))
        if only in (None, "smollm2"):
            cells.update(smollm2_cells(Path(tmp)))
    path.write_text(json.dumps(cells, indent=1, sort_keys=True) + "\n")
    print(f"{len(cells)} cells, {sum(len(c) for c in cells.values())} tensors -> {path}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    bad = 0
    for cell in sorted(set(a) | set(b)):
        if cell not in a or cell not in b:
            print(f"{cell}: only in {'after' if cell in b else 'before'}")
            bad += 1
            continue
        diff = sorted(k for k in set(a[cell]) | set(b[cell]) if a[cell].get(k) != b[cell].get(k))
        if diff:
            print(f"{cell}: {len(diff)} tensors differ, e.g. {diff[:3]}")
            bad += 1
    n = sum(len(c) for c in a.values())
    print(f"{len(a)} cells, {n} tensors: " + ("bit-identical" if not bad else f"{bad} cells differ"))
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("file", type=Path)
    r.add_argument("--only", choices=("tiny", "smollm2"))
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.file, args.only)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
