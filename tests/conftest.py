"""Tiny random models of every supported architecture, built from configs (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON)
    if arch == "mistral":
        return MistralConfig(**COMMON, sliding_window=8)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, sliding_window=8, use_sliding_window=True, max_window_layers=1,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    if arch == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gemma3", "opt"]


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.config.use_cache = False
    return model.eval()


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level-ish word tokenizer over a fixed vocabulary, built offline; ``bos``: it puts <s> before every
    text by default, as Llama's and Gemma's do (through a post-processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def job(method, target, targets=("Linear",), ignore=(), **fields):
    """The engine's ``Job`` for ``method`` with every linear at ``target``, collecting what the method needs with no
    position left out; ``fields``: the Job's others (sequential, true_sequential, stats)."""
    from dataclasses import replace

    from statprune_cli.engine import Collect, Job, Selection

    collect = Collect(0, method.needs_gram, method.sketch_rank, method.sketch_every)
    rule = lambda index, linears, stats: {name: replace(target, name=name) for name in linears}  # noqa: E731
    return Job(method, rule, Selection(tuple(targets), tuple(ignore)), collect, **fields)


def random_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n_words,), generator=g))


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama checkpoint with tokenizer, as a user's local folder."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def text_files(tmp_path: Path) -> dict[str, Path]:
    """Calibration (JSON lines) and evaluation (plain text) files over the tiny vocabulary."""
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"text": random_text(300, seed=i)}) + "\n" for i in range(20)))
    ev = tmp_path / "eval.txt"
    ev.write_text(random_text(2000, seed=99))
    return {"cal": cal, "eval": ev}


def write_config(path: Path, model_dir: Path, files: dict[str, Path], out: Path, **sections) -> Path:
    """A YAML config for the tiny model; ``sections`` update the defaults per section."""
    import yaml

    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "calibration": {"dataset": f"jsonl:{files['cal']}", "nsamples": 8, "seqlen": 32, "batch_size": 4},
        "pruning": {"method": "wanda", "sparsity": 0.5},
        "eval": {"datasets": [f"text:{files['eval']}"], "seqlen": 32, "batch_size": 4},
        "output": {"dir": str(out)},
        "runtime": {"device": "cpu"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def prune_report(tmp_path: Path, model_dir: Path, files: dict[str, Path], **pruning) -> dict:
    """`statprune prune` of the tiny model with these ``pruning`` keys; its --json report (the run must succeed)."""
    from typer.testing import CliRunner

    from statprune_cli.cli import app

    cfg = write_config(tmp_path / "run.yaml", model_dir, files, tmp_path / "out", pruning=pruning)
    res = CliRunner().invoke(app, ["prune", str(cfg), "-q", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)
