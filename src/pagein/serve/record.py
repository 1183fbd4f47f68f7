"""Fault traces: what a restore's guest touched, when, from which thread, and how each
page arrived; and the working-set file written from them when the VM goes.

A :class:`Recorder` is fed by one session (its only writer, from the session thread):

- :meth:`Recorder.fault` for every page-fault message served: the offset in the memory
  file, the time since the VM connected, the faulting thread (``UFFD_FEATURE_THREAD_ID``;
  0 when the VMM did not negotiate it) and whether it was served as data or zeros;
- :meth:`Recorder.filled` for every range installed, with its
  :class:`~pagein.serve.cause.Cause`.

The fault engine hands both over in batches with their own monotonic timestamps
(:meth:`Recorder.fault_at`, :meth:`Recorder.filled_at`).

:meth:`Recorder.finish` writes the trace (JSON, below) and, if asked, the working set
(:mod:`pagein.snapshot.workingset`): the faulted pages in first-touch order, with the
snapshot's bytes; a fault in a 2 MiB hugetlb region is recorded as its whole huge page.
Only faults count as touches; pages filled ahead of the guest (readahead, prefetch,
background) were not necessarily used.

Trace file (JSON)::

    {"format": "pagein-trace", "version": 1, "page_size": 4096, "memory_size": N,
     "strategy": "readahead 256 KiB",                          # absent in older traces
     "regions": [[offset, size_bytes, page_size], ...],
     "faults": [[t_us, offset, thread_id, served], ...],       # served: demand | zero
     "fills":  [[t_us, offset, pages, cause], ...]}            # cause: Cause.label
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pagein.errors import PageinError, SnapshotFormatError
from pagein.serve.cause import Cause
from pagein.serve.firecracker import Region
from pagein.snapshot import workingset
from pagein.snapshot.source import PageSource

__all__ = ["Fault", "Fill", "Recorder", "Trace", "load_trace"]

log = logging.getLogger("pagein.serve")

TRACE_FORMAT = "pagein-trace"
TRACE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Fault:
    time_us: int
    offset: int
    thread_id: int
    zero: bool


@dataclass(frozen=True, slots=True)
class Fill:
    time_us: int
    offset: int
    pages: int
    cause: Cause


@dataclass(frozen=True, slots=True)
class Trace:
    """A loaded trace file."""

    page_size: int
    memory_size: int
    regions: tuple[tuple[int, int, int], ...]
    faults: tuple[Fault, ...]
    fills: tuple[Fill, ...]
    strategy: str | None = None  # how the restore was served; None in older traces


class OutputNames:
    """Hand out the files of the VMs one ``--record``/``--trace`` server records.

    The first VM to go writes ``path`` itself; later ones write ``path.2``, ``path.3``,
    ... so one server recording several VMs never overwrites a recording.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken: dict[str, int] = {}

    def claim(self, path: str) -> str:
        with self._lock:
            n = self._taken.get(path, 0) + 1
            self._taken[path] = n
        return path if n == 1 else f"{path}.{n}"


class Recorder:
    """Collect one session's faults and fills; write them out when the VM goes."""

    def __init__(self, *, trace_path: str | None = None,
                 working_set_path: str | None = None,
                 names: OutputNames | None = None, strategy: str | None = None) -> None:
        self.trace_path = trace_path
        self.strategy = strategy
        self.working_set_path = working_set_path
        self._names = names
        self._t0 = time.monotonic_ns()
        self._faults: list[tuple[int, int, int, bool]] = []
        self._fills: list[tuple[int, int, int, str]] = []

    def start(self) -> None:
        """Set time zero (the VM connected)."""
        self._t0 = time.monotonic_ns()

    def _now(self) -> int:
        return (time.monotonic_ns() - self._t0) // 1000

    def fault(self, offset: int, thread_id: int, zero: bool) -> None:
        self._faults.append((self._now(), offset, thread_id, zero))

    def filled(self, offset: int, pages: int, cause: Cause) -> None:
        self._fills.append((self._now(), offset, pages, cause.label))

    def fault_at(self, t_ns: int, offset: int, thread_id: int, zero: bool) -> None:
        """Log a fault served at monotonic time ``t_ns``."""
        self._faults.append((max(0, t_ns - self._t0) // 1000, offset, thread_id, zero))

    def filled_at(self, t_ns: int, offset: int, pages: int, cause: Cause) -> None:
        """Log a fill made at monotonic time ``t_ns``."""
        self._fills.append((max(0, t_ns - self._t0) // 1000, offset, pages, cause.label))

    @property
    def fault_count(self) -> int:
        return len(self._faults)

    def touched(self) -> list[int]:
        """Page offsets the guest faulted on, in first-touch order (repeats kept)."""
        return [off for _, off, _, _ in self._faults]

    def finish(self, source: PageSource, regions: Sequence[Region]) -> list[PageinError]:
        """Write the working set and the trace (each only if a path was given); return
        one error per file that could not be written (empty: all written).

        Each file is written on its own: the working set (what a later restore
        prefetches, so the one that matters) first, and a trace that cannot be written
        never costs it. Each goes to a temporary name renamed into place, removed
        again if writing fails (a full disk leaves no partial or empty file). The guest
        is gone by then, so nothing else depends on either.
        """
        if self._names is not None:
            if self.trace_path is not None:
                self.trace_path = self._names.claim(self.trace_path)
            if self.working_set_path is not None:
                self.working_set_path = self._names.claim(self.working_set_path)
        errors: list[PageinError] = []
        if self.working_set_path is not None:
            touched = [o for o in self.touched() if o % 4096 == 0]
            # A fault in a 2 MiB region was served as its whole huge page: record that page
            # (aligned, 2 MiB), so the prefetch of it is one fill from one data run.
            huge = [(r.offset, r.size_bytes, r.page_size) for r in regions
                    if r.page_size > 4096]
            try:
                n = workingset.write(self.working_set_path, source, touched, huge)
            except (OSError, PageinError) as e:
                errors.append(PageinError(f"cannot write the working set "
                                          f"{self.working_set_path}: {_why(e)}"))
            else:
                log.info("working set %s: %d faults, %d data pages", self.working_set_path,
                         len(touched), n)
        if self.trace_path is not None:
            try:
                self._write_trace(self.trace_path, source, regions)
            except OSError as e:
                errors.append(PageinError(f"cannot write the trace {self.trace_path}: "
                                          f"{_why(e)}"))
        return errors

    def _write_trace(self, path: str, source: PageSource, regions: Sequence[Region]) -> None:
        doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "page_size": 4096,
               "memory_size": source.size,
               **({} if self.strategy is None else {"strategy": self.strategy}),
               "regions": [[r.offset, r.size_bytes, r.page_size] for r in regions],
               "faults": [[t, o, tid, "zero" if z else "demand"]
                          for t, o, tid, z in self._faults],
               "fills": [list(f) for f in self._fills]}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _why(e: BaseException) -> str:
    """An error's reason without repeating the path the message already names."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def load_trace(path: str) -> Trace:
    """Read a trace file written by :class:`Recorder` (SnapshotFormatError if not one)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SnapshotFormatError(f"cannot read trace {path}: {e.strerror}") from e
    if raw.startswith(workingset.MAGIC):
        # --record FILE writes the working set to FILE and the trace beside it.
        trace = f"{path}.trace.json"
        where = f" ({trace} is there)" if os.path.exists(trace) else ""
        raise SnapshotFormatError(
            f"{path} is a working set (written by --record), not a trace: pass its trace, "
            f"FILE.trace.json next to the --record FILE{where}, or the file given to --trace")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise SnapshotFormatError(f"{path} is not a pagein trace (not JSON text: "
                                  f"{str(e)[:120]}): pass the file written by pagein serve "
                                  "--trace, or FILE.trace.json next to a --record FILE") from e
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
        raise SnapshotFormatError(f"{path} is not a pagein trace (field format): pass the "
                                  "file written by pagein serve --trace/--record")
    if doc.get("version") != TRACE_VERSION:
        raise SnapshotFormatError(f"trace {path} has version {doc.get('version')}, this "
                                  f"pagein reads version {TRACE_VERSION}")
    try:
        faults = tuple(Fault(int(t), int(o), int(tid), s == "zero")
                       for t, o, tid, s in doc["faults"])
        fills = tuple(Fill(int(t), int(o), int(n), Cause.from_label(a))
                      for t, o, n, a in doc["fills"])
        regions = tuple((int(a), int(b), int(c)) for a, b, c in doc["regions"])
        strategy = doc.get("strategy")  # written since the trace named it; optional
        if strategy is not None and not isinstance(strategy, str):
            raise TypeError(f"field strategy is {type(strategy).__name__}, not a string")
        return Trace(int(doc["page_size"]), int(doc["memory_size"]), regions, faults, fills,
                     None if strategy is None else strategy[:200])
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotFormatError(f"trace {path} has a malformed field: {e}") from e
