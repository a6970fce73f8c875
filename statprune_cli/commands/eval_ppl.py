"""``statprune eval-ppl``: perplexity of a model (pruned or not) on the config's evaluation sets, layer by layer."""

from __future__ import annotations

from typing import Any

from statprune_cli.config import Config, EvalConfig
from statprune_cli.load import check_seqlen, load_model_config, load_tokenizer
from statprune_cli.perplexity import eval_sets, evaluate_perplexity
from statprune_cli.runtime import decide_streaming, reading_engine, setup_runtime
from statprune_cli.ui import UI


def run_eval(cfg: Config, ui: UI | None = None) -> list[dict[str, Any]]:
    """Perplexity of ``cfg.model`` on every data set of ``cfg.eval``."""
    ui = ui or UI()
    device = setup_runtime(cfg)
    config = load_model_config(cfg.model)
    check_seqlen("eval.seqlen", cfg.eval.seqlen, EvalConfig.seqlen, config, how="--seqlen or eval.seqlen")
    streaming = decide_streaming(cfg)
    tokenizer = load_tokenizer(cfg.model)
    sets = eval_sets(cfg, tokenizer)
    with reading_engine(cfg, device, streaming, None, ui) as engine:
        return [evaluate_perplexity(engine, es, cfg.eval.batch_size).to_dict() for es in sets]

