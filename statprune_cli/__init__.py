"""statprune: post-training pruning of LLMs with statistical correction.

A run, in the order of its files: ``config`` (one YAML file, ``--set`` overrides) -> ``plan`` (every unset choice
decided once) -> ``load`` (model, tokenizer, checks against the model) -> ``data`` (calibration windows) ->
``pruning`` (``prepasses``, then the layer-wise ``engine`` with a method from ``methods``) -> ``export`` (the
folder, written atomically) -> ``report`` (report.json). ``commands/`` holds one file per command over that core;
``cli`` parses the command line and prints.
"""

__version__ = "0.1.0"
