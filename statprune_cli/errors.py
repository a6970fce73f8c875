"""The two kinds of failure a user sees: bad input (exit 2) and a run that broke (exit 1)."""

from typing import Any

SHOWN_CHARS = 200  # an echoed value longer than this is cut: a hostile config must not print megabytes
MESSAGE_CHARS = 1000  # a whole message, whatever its parts


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with an ellipsis and the count left out."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def capped(message: str, limit: int = MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message) - limit} more characters)"


class InputError(Exception):
    """Bad input found before heavy work: a config key, a file, a data set. Exit code 2."""


class ConfigError(InputError):
    """A config value that is wrong; the message names its key path and what was expected."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(capped(f"{key}: {message}"))  # messages echo values: a cap for the ones not cut by ``shown``
        self.key = key


class PruneError(RuntimeError):
    """A failure during the run itself (non-finite statistics, say). Exit code 1."""


class OutputLocked(RuntimeError):
    """Another run holds the output's lock (``lock.py``). Exit code 1: the input is fine, the moment is not."""
