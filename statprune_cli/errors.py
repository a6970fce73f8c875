"""The two kinds of failure a user sees: bad input (exit 2) and a run that broke (exit 1)."""


class InputError(Exception):
    """Bad input found before heavy work: a config key, a file, a data set. Exit code 2."""


class ConfigError(InputError):
    """A config value that is wrong; the message names its key path and what was expected."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class PruneError(RuntimeError):
    """A failure during the run itself (non-finite statistics, say). Exit code 1."""
