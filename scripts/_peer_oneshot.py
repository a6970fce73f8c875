"""One llm-compressor `oneshot` run; executed by scripts/bench_peer.py inside the peer venv (.venv-peer).

It never imports statprune_cli (that lives in the project venv). Input: the calibration windows
that statprune draws (a safetensors file holding int64 ``input_ids`` of shape (nsamples, seqlen)).
Output: a plain dense Hugging Face folder that stock transformers loads (no compressed-tensors
format, no quantization/sparsity config), and a JSON result with the wall time of the `oneshot`
call alone (model loading and saving are outside it), package versions and checks:

- the windows reached the model verbatim (llm-compressor's own sampler would permute equal-length
  windows; see stable_length_sampler): a forward pre-hook on the input embedding records every
  input_ids batch of the first (calibration) pass of the first subgraph, and they must equal the
  windows in order, with no padding, truncation or shuffling;
- the pruned modules: every nn.Linear inside the decoder layers has the asked sparsity, and the
  head (tied to the embedding) stays dense.

Usage (peer venv): python scripts/_peer_oneshot.py --model DIR --windows FILE --method wanda|sparsegpt
                   --setting 50%|2:4 --out DIR --result FILE.json [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch


def parse_setting(setting: str) -> tuple[float, str]:
    """'50%' -> (0.5, '0:0'); '2:4' -> (0.5, '2:4')."""
    if setting.endswith("%"):
        return float(setting[:-1]) / 100, "0:0"
    n, m = (int(v) for v in setting.split(":"))
    return n / m, f"{n}:{m}"


def build_modifier(method: str, sparsity: float, mask_structure: str, percdamp: float, blocksize: int):
    # The same linears statprune prunes: every nn.Linear in the decoder layers. llm-compressor's default
    # targets=["Linear"] also matches lm_head, which it would prune (and, tied, the embedding with it);
    # its own docs say to ignore it with a regex. Its module names carry a trailing dot ("lm_head."),
    # so an exact-name ignore would not match: "re:.*lm_head" does.
    common = dict(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**common)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(**common, dampening_frac=percdamp, block_size=blocksize)
    raise SystemExit(f"unknown method {method!r}: expected wanda or sparsegpt")


def save_dense(model: torch.nn.Module, src: Path, out: Path) -> None:
    """A plain dense HF folder: weights as they are, config without compression metadata, tokenizer files copied."""
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), save_compressed=False)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("quantization_config", "sparsity_config", "compression_config"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for f in src.iterdir():  # tokenizer and chat template, verbatim from the source folder
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")) and f.name not in (
                "config.json", "generation_config.json") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def stable_length_sampler():
    """Make llm-compressor's LengthAwareSampler keep the windows' order (the returned hook's ``unpatched`` holds
    the order llm-compressor itself would have used).

    With shuffle_calibration_samples=False, llm-compressor orders the samples by
    ``torch.argsort(lengths, descending=True)`` (llmcompressor/datasets/utils.py, LengthAwareSampler),
    an unstable sort: with 64 windows of equal length it yields 48, 33, ..., 47, 32, 49, ... 16, 1, ...
    0, 17, ..., a permutation of the windows (the same set, another order and other batches). The
    stable sort keeps equal lengths in their given order, so the windows arrive exactly as statprune
    feeds them; the set and the lengths are untouched either way.
    """
    from llmcompressor.datasets import utils

    cls = utils.LengthAwareSampler
    original = cls.__init__

    def init(self, data_source, num_samples=None, batch_size=1):
        original(self, data_source, num_samples=num_samples, batch_size=batch_size)
        if "input_ids" in data_source.column_names:
            lengths = torch.tensor([len(sample) for sample in data_source["input_ids"]])
            init.unpatched = list(self.order)
            self.order = torch.argsort(lengths, descending=True, stable=True).tolist()

    init.unpatched = None
    cls.__init__ = init
    return init


def sparsity_summary(model: torch.nn.Module) -> dict:
    layers = model.model.layers
    per_layer, zeros, total, names = [], 0, 0, []
    for i, layer in enumerate(layers):
        lz = lt = 0
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                z = int((mod.weight == 0).sum())
                lz, lt = lz + z, lt + mod.weight.numel()
                names.append(f"model.layers.{i}.{name}")
        per_layer.append(round(lz / lt, 6))
        zeros, total = zeros + lz, total + lt
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return {"pruned_linears": len(names), "linear_sparsity": zeros / total, "layer_sparsity_min": min(per_layer),
            "layer_sparsity_max": max(per_layer), "embedding_zeros": int((emb == 0).sum()),
            "head_zeros": int((head == 0).sum()), "head_tied": head.data_ptr() == emb.data_ptr()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--windows", type=Path, required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--setting", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--blocksize", type=int, default=128)
    args = ap.parse_args()

    import datasets
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    windows = load_file(str(args.windows))["input_ids"]
    assert windows.dtype == torch.int64 and windows.dim() == 2, (windows.dtype, windows.shape)
    nsamples, seqlen = windows.shape
    ds = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
    sparsity, mask_structure = parse_setting(args.setting)
    modifier = build_modifier(args.method, sparsity, mask_structure, args.percdamp, args.blocksize)

    unpatched_order = stable_length_sampler()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    seen: list[torch.Tensor] = []

    def record(_module, inputs):
        x = inputs[0]
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            seen.append(x.detach().cpu().clone())

    handle = model.get_input_embeddings().register_forward_pre_hook(record)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=modifier, pipeline="sequential", num_calibration_samples=nsamples,
            max_seq_length=seqlen, batch_size=args.batch_size, shuffle_calibration_samples=False)
    oneshot_s = time.perf_counter() - t0
    handle.remove()

    # The first pass over the data is the calibration pass of subgraph 0 (which holds the embedding).
    nb = -(-nsamples // args.batch_size)
    first = torch.cat(seen[:nb]) if len(seen) >= nb else torch.empty(0, dtype=torch.long)
    verbatim = bool(first.shape == windows.shape and torch.equal(first, windows))
    summary = sparsity_summary(model)
    save_dense(model, args.model, args.out)
    result = {
        "tool": "llmcompressor", "method": args.method, "setting": args.setting, "oneshot_s": oneshot_s,
        "windows_verbatim": verbatim, "embedding_calls": len(seen), "batch_size": args.batch_size,
        "unpatched_sampler_order": unpatched_order.unpatched,
        "modifier": repr(modifier), "sparsity": summary, "threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")},
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("oneshot_s", "windows_verbatim", "embedding_calls")}))
    if not verbatim:
        raise SystemExit("the calibration windows did not reach the model verbatim (order, length or content changed)")


if __name__ == "__main__":
    main()
