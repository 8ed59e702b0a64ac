"""Progress and console output (rich): one place so every stage reports the same way."""
from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console

import shutil

_width = None if shutil.get_terminal_size((0, 0)).columns else 160
console = Console(stderr=True, highlight=False, width=_width)   # progress, errors, settings
stdout = Console(highlight=False, width=_width)                  # results people compare (tables)


class Progress:
    """Stage-by-stage progress: ``with progress.stage("compile"): ...``; ``progress.log(msg)``."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        if self.quiet:
            yield
        else:
            with console.status(f"[bold]{name}[/]..."):
                yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        if not self.quiet:
            console.print(f"[green]done[/] {name} ({self.timings[name]:.1f}s)")

    def log(self, msg: str) -> None:
        if not self.quiet:
            console.print(f"  {msg}")
