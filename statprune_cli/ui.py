"""Terminal output: rich progress bars on a terminal, plain log lines in CI and batch jobs.

Everything goes to stderr, so ``--json`` leaves stdout to the report alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def silence_libraries() -> None:
    """Quiet means only errors on stderr: transformers draws its own bars ("Loading weights", "Writing model
    shards") and logs warnings, and the hub client draws download bars, none of which go through this UI."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


class UI:
    def __init__(self, quiet: bool = False, interactive: bool | None = None) -> None:
        self.quiet = quiet
        if quiet:
            silence_libraries()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        # In a CI log there is no terminal width: 80 columns would truncate the per-layer table's names.
        self.console = Console(stderr=True, width=None if self.interactive else 160)
        self._bar: Progress | None = None
        self._depth = 0

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.interactive:
            self.console.print(f"[dim]statprune[/dim] {escape(message)}")  # a path or an error may hold "[/..."
        else:
            print(f"[statprune {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields ``advance()``. On a terminal: one bar per task, nested tasks share one display.
        Otherwise: a log line per ~10% of the outermost task only, so CI logs stay short."""
        if self.quiet or total <= 0:
            yield lambda: None
            return
        self._depth += 1
        try:
            if self.interactive:
                owner = self._bar is None
                if owner:
                    self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), console=self.console, transient=True)
                    self._bar.start()
                task = self._bar.add_task(description, total=total)
                try:
                    yield lambda: self._bar.advance(task)
                finally:
                    self._bar.remove_task(task)
                    if owner:
                        self._bar.stop()
                        self._bar = None
            elif self._depth > 1:
                yield lambda: None
            else:
                yield self._log_every_tenth(description, total)
        finally:
            self._depth -= 1

    def _log_every_tenth(self, description: str, total: int) -> Callable[[], None]:
        done = 0
        step = max(1, -(-total // 10))  # at most ten lines per task

        def advance() -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                self.log(f"{description}: {done}/{total}")

        return advance
