"""What the subcommands print: progress and tables, drawn by ``rich`` on a terminal,
plain lines everywhere else.

On a terminal, progress is a live bar with the bytes done, the rate and the time left,
and a table fits the terminal's width. When the stream is a pipe or a file (a script, a
CI log) the output is plain text without escape sequences: a progress line every few
seconds, tables as aligned columns (:func:`pagein.cli._format.table`), so that grep and
diff keep working.

``rich`` is imported here only, and only inside the functions that draw on a terminal:
``pagein serve`` imports the CLI to parse its flags, and neither it nor its serving
workers may pay for, or carry, a rendering library they never use (a test checks it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol, TextIO

from pagein.cli._format import table as plain_table

__all__ = ["ProgressView", "print_table", "progress_view"]


class _Report(Protocol):
    """What a progress callback receives (``pagein.snapshot.store.ops.Progress``)."""

    @property
    def phase(self) -> str: ...
    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def done_bytes(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...


class ProgressView(Protocol):
    """A progress callback that must be closed when the work ends."""

    def __call__(self, p: _Report) -> None: ...
    def close(self) -> None: ...


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Quiet:
    def __call__(self, p: _Report) -> None:
        pass

    def close(self) -> None:
        pass


class _Lines:
    """Plain progress for a pipe or a file: one line every few seconds, and the last."""

    def __init__(self, stream: TextIO, every_s: float = 2.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.phase = ""

    def __call__(self, p: _Report) -> None:
        now = time.monotonic()
        final = bool(p.total) and p.done >= p.total
        if p.phase == self.phase and now - self.last < self.every_s and not final:
            return
        self.phase, self.last = p.phase, now
        elapsed = now - self.started
        count = f"{p.done}/{p.total}" if p.total else (str(p.done) if p.done else "")
        text = f"{p.phase} {count}".rstrip()
        if p.total_bytes:
            rate = p.done_bytes / max(elapsed, 1e-9)
            text += f", {_size(p.done_bytes)} of {_size(p.total_bytes)} ({_size(rate)}/s)"
        self.stream.write(f"{text} ({elapsed:.1f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _Bar:
    """A live rich bar on a terminal: phase, bar, bytes (or counts), rate, time left."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        console = Console(file=stream)
        self._columns: dict[bool, tuple[Any, ...]] = {
            True: (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn()),
            False: (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn()),
        }
        self._progress = Progress(console=console, transient=True)
        self._progress.start()
        self._task: Any = None
        self._key: tuple[str, bool] | None = None

    def __call__(self, p: _Report) -> None:
        in_bytes = p.total_bytes > 0
        if self._key != (p.phase, in_bytes):  # a new phase: a bar of its own
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._progress.columns = self._columns[in_bytes]
            self._task = self._progress.add_task(p.phase, total=(p.total_bytes if in_bytes
                                                                 else p.total or None))
            self._key = (p.phase, in_bytes)
        self._progress.update(self._task, completed=p.done_bytes if in_bytes else p.done)

    def close(self) -> None:
        self._progress.stop()


def progress_view(quiet: bool, stream: TextIO | None = None) -> ProgressView:
    """Progress on ``stream`` (stderr): a rich bar on a terminal, plain lines otherwise,
    nothing with ``quiet``."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return _Quiet()
    return _Bar(stream) if stream.isatty() else _Lines(stream)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                title: str | None = None, stream: TextIO | None = None,
                left: Collection[int] = (0,), indent: str = "") -> None:
    """Print a table: the ``left`` columns left-aligned, the rest right-aligned; drawn by
    rich to fit a terminal, plain aligned columns (each line after ``indent``) anywhere
    else."""
    stream = sys.stdout if stream is None else stream
    if not stream.isatty():
        if title:
            stream.write(title + "\n")
        for line in plain_table(headers, rows, left).splitlines():
            stream.write(indent + line + "\n")
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i in left else "right", overflow="fold")
    for row in rows:
        t.add_row(*row)
    Console(file=stream).print(t)
