"""Log lines a peer can trigger again and again, at a bounded rate.

A VMM that sends garbage forever, reconnects with bad handshakes in a loop, or a
server that cannot accept because its fd limit is reached, must not turn into
megabytes of log per second. :class:`RateLimitedLog` lets through at most ``lines``
lines per ``interval_s`` for each key (a peer's pid, ``"accept"``), and at most
``total_lines`` for all keys together (a peer that forks to get new pids is still
bounded). What it holds back is counted and said in one line when the key speaks
again after its interval, or on :meth:`flush`::

    WARNING pagein.serve: vm pid=4242: ignoring 4096 unexpected bytes on the socket
    WARNING pagein.serve: vm pid=4242: 37 similar line(s) suppressed in the last 10 s

Values a peer controls go through :func:`peer_text` (repr-escaped, cut) before they
reach a line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pagein.errors import shown

__all__ = ["RateLimitedLog", "peer_text"]

def peer_text(value: object, limit: int = 120) -> str:
    """A value a peer controls, safe for one log line: repr-escaped and cut to ``limit``."""
    return shown(value, limit)


@dataclass(slots=True)
class _Window:
    start: float
    emitted: int = 0
    suppressed: int = 0
    prefix: str = ""  # what the suppressed lines were about (the first one's prefix)


class RateLimitedLog:
    """At most ``lines`` lines per ``interval_s`` per key (and ``total_lines`` for all
    keys), plus one "suppressed K" line for what was held back. Thread-safe."""

    def __init__(self, logger: logging.Logger, *, lines: int = 5, interval_s: float = 10.0,
                 total_lines: int = 100, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._lines = lines
        self._total = total_lines
        self._interval = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()  # oldest first
        self._all = _Window(clock(), prefix="")

    def log(self, level: int, key: Hashable, prefix: str, msg: str, *args: object) -> bool:
        """Log ``prefix + ": " + msg % args`` unless ``key`` (or everyone) has used its
        lines for this interval; return whether the line was written.

        ``prefix`` names the peer (``vm pid=4242``) in the suppressed-count line too.
        """
        now = self._clock()
        with self._lock:
            due = self._roll(key, now)
            if now - self._all.start >= self._interval:
                due.append(self._said(None, self._all))
                self._all = _Window(now)
            mine, everyone = self._windows[key], self._all
            ok = mine.emitted < self._lines and everyone.emitted < self._total
            if ok:
                mine.emitted += 1
                everyone.emitted += 1
            elif mine.emitted >= self._lines:
                mine.suppressed += 1
                mine.prefix = prefix
            else:
                # Held back by the shared budget only: counted there, so that a peer
                # forking for fresh pids cannot make each pid's count a line of its own.
                everyone.suppressed += 1
        for line in due:
            if line:
                self._log.log(level, "%s", line)
        if ok:
            self._log.log(level, f"{prefix}: {msg}", *args)
        return ok

    def flush(self, key: Hashable | None = None, level: int = logging.WARNING) -> None:
        """Say what is still held back (for ``key``, or for every key) and forget it."""
        with self._lock:
            keys = list(self._windows) if key is None else [key]
            due = [self._said(k, self._windows.pop(k)) for k in keys if k in self._windows]
        for line in due:
            if line:
                self._log.log(level, "%s", line)

    def _roll(self, key: Hashable, now: float) -> list[str]:
        """Start a new interval for ``key`` if its last one is over; the lines now due."""
        w = self._windows.get(key)
        if w is not None and now - w.start < self._interval:
            self._windows.move_to_end(key)
            return []
        due = [] if w is None else [self._said(key, w)]
        self._windows[key] = _Window(now)
        self._windows.move_to_end(key)
        while len(self._windows) > self._max_keys:  # bounded memory: forget the oldest
            old_key, old = self._windows.popitem(last=False)
            due.append(self._said(old_key, old))
        # Peers that went quiet: say what they had held back now, not never.
        while self._windows:
            old_key, old = next(iter(self._windows.items()))
            if now - old.start < self._interval:
                break
            del self._windows[old_key]
            due.append(self._said(old_key, old))
        return due

    def _said(self, key: Hashable | None, w: _Window) -> str:
        if not w.suppressed:
            return ""
        if key is None:
            return (f"{w.suppressed} line(s) from several peers suppressed in the last "
                    f"{self._interval:g} s")
        return (f"{w.prefix}: {w.suppressed} similar line(s) suppressed in the last "
                f"{self._interval:g} s")
