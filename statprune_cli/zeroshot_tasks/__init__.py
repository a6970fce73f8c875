"""lm-eval task files for the local zero-shot data: each YAML names the stock task it keeps and the local files it reads."""
