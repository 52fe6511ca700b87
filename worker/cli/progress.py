"""Progress for long commands: a live bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunProgress:
    """Shows ``completed`` of ``total`` with a rate and an ETA.

    On a terminal it draws a bar; otherwise (CI, a log file) it writes a plain line every
    ``interval`` seconds and one at the end. The rate counts only what this process saw done,
    so a resumed run does not claim the earlier run's work as its speed.
    """

    def __init__(
        self,
        *,
        description: str,
        total: int,
        completed: int = 0,
        stream: TextIO | None = None,
        interval: float = 5.0,
        force_plain: bool = False,
    ) -> None:
        self.description = description
        self.total = total
        self.start_completed = completed
        self.completed = completed
        self.stream = stream or sys.stderr
        self.interval = interval
        self.started = time.monotonic()
        self._last_line = float("-inf")  # the first update is shown at once
        self._last_shown: int | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if self.stream.isatty() and not force_plain:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}/s"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, rate="-")
            self._bar.start()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.completed - self.start_completed) / elapsed if elapsed > 0 else 0.0

    def update(self, completed: int) -> None:
        """Record that ``completed`` items are done in all."""
        self.completed = completed
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=completed, rate=f"{self.rate:,.0f}")
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def _line(self) -> None:
        rate = self.rate
        share = 100.0 * self.completed / self.total if self.total else 100.0
        eta = _eta((self.total - self.completed) / rate) if rate > 0 else "?"
        self.stream.write(
            f"{self.description}: {self.completed}/{self.total} ({share:.1f}%), "
            f"{rate:,.1f}/s, ETA {eta}\n"
        )
        self.stream.flush()
        self._last_shown = self.completed

    def close(self) -> None:
        """Stop the bar, or write the final plain line (unless the last one already said it)."""
        if self._bar is not None:
            self._bar.stop()
        elif self._last_shown != self.completed:
            self._line()

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
