"""Terminal output: rich progress bars on a terminal, plain log lines in CI and batch jobs.

Everything goes to stderr, so ``--json`` leaves stdout to the report alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class UI:
    def __init__(self, quiet: bool = False, interactive: bool | None = None) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.interactive:
            self.console.print(f"[dim]statprune[/dim] {message}")
        else:
            print(f"[statprune {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields ``advance()``; a bar on a terminal, a line per ~10% otherwise."""
        if self.quiet or total <= 0:
            yield lambda: None
            return
        if self.interactive:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=self.console, transient=True) as bar:
                task = bar.add_task(description, total=total)
                yield lambda: bar.advance(task)
            return
        done = 0
        step = max(1, total // 10)

        def advance() -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                self.log(f"{description}: {done}/{total}")

        yield advance
