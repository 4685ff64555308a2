"""Progress bars on stderr (rich), shown only when stderr is a terminal.

While a bar is live, log records are written through the bar's console (rich's stderr
proxy), so a warning lands on its own line above the bar instead of inside it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from types import TracebackType
from typing import Any


class Progress:
    """`with Progress("export") as bar: bar.update(done, total)`; silent when not a TTY.

    `unit` names what is counted (the rate column reads "12.3 images/s"); `update(...,
    note="3 failed")` shows running counts after the ETA.
    """

    def __init__(
        self,
        label: str,
        *,
        enabled: bool | None = None,
        total: int | None = None,
        unit: str = "items",
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="", note="")
            self._route_logging()
        return self

    def _route_logging(self) -> None:
        """Point stderr log handlers at the bar's console while it is live."""
        stream = _ConsoleStream(self._bar.console)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (
                sys.stderr,
                sys.__stderr__,
            ):
                self._swapped.append((handler, handler.stream))
                handler.setStream(stream)

    def rate(self) -> float:
        """Items per second since the bar started."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, total: int | None = None, note: str | None = None) -> None:
        self.done = done
        if self._bar is not None:
            fields: dict[str, Any] = {"rate": f"{self.rate():.1f} {self.unit}/s"}
            if note is not None:
                fields["note"] = note
            self._bar.update(self._task, completed=done, total=total, **fields)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n, self.total)

    def summary(self) -> str:
        """`in 12.3 s (4.5 images/s)`, for the closing line."""
        return summary(self.done, time.monotonic() - self.started, self.unit)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped.clear()
        if self._bar is not None:
            self._bar.stop()


def summary(done: int, elapsed: float, unit: str) -> str:
    """`in 12.3 s (4.5 files/s)`: the tail of every long command's closing line on stderr,
    for work counted across several bars (one per model)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"in {elapsed:.1f} s ({rate:.1f} {unit}/s)"


class _ConsoleStream:
    """A text stream that prints whole lines above a live rich display.

    Lines are not wrapped by rich (soft_wrap), so a long log line stays one line that the
    terminal wraps, as without a bar.
    """

    def __init__(self, console: Any) -> None:
        self.console = console
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            line, self._buffer = self._buffer, ""
            self.console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)


class RateMeter:
    """Items per second over a sliding window, from a running total (a daemon's done count)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.samples and total < self.samples[-1][1]:
            self.samples.clear()  # the count went down (jobs cleaned up): start over
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def eta(left: int, rate: float) -> str:
    """H:MM:SS to finish `left` items at `rate` per second; "-" when unknown."""
    if rate <= 0 or left <= 0:
        return "-"
    s = int(left / rate)
    return f"{s // 3600}:{s % 3600 // 60:02}:{s % 60:02}"
