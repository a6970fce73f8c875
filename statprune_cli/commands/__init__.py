"""One file per command, each read top to bottom: what the command checks, loads, runs and writes.

They share the core: ``runtime`` (device, threads, placement), ``data`` and ``perplexity`` (windows and evaluation
sets), ``plan``, ``pruning`` (pre-passes and the layer-wise engine) and ``export``.
"""
