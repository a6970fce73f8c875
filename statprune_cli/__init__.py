"""statprune: post-training pruning of LLMs with statistical correction."""

__version__ = "0.1.0"
