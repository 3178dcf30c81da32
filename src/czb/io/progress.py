"""The download progress bar (``rich``, imported only when a bar is shown)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class ProgressBar:
    """A rich progress bar on stderr, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.total = total
        self.bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(description, total=total, start=False)

    @contextlib.contextmanager
    def shown(self) -> Iterator[ProgressBar]:
        if self.bar is None:
            yield self
            return
        self.bar.start()
        self.bar.start_task(self.task)
        try:
            yield self
        finally:
            self.bar.stop()

    def reset(self, completed: int) -> None:
        if self.bar is not None:
            self.bar.reset(self.task, completed=completed, total=self.total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
