"""The self-contained lazy-restore demo behind ``pagein demo``.

It writes a snapshot file of a memory region with known content, then restores it two
ways and verifies every byte of each:

- eager: ``read()`` the whole file into fresh anonymous memory, then use it;
- lazy: map empty memory, register it with userfaultfd and let a pagein handler in a
  separate process fill each page on first touch (:func:`pagein.serve.local.restore_lazily`),
  with each restore strategy (one page per fault, a readahead window, or everything
  populated in the background while faults jump the queue).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagein.errors import IntegrityError
from pagein.serve.local import restore_lazily
from pagein.serve.strategies import StrategyName
from pagein.sys.mapping import PAGE_SIZE, Mapping

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class RestoreRun:
    """One restore method's measurements (seconds from the start of the restore)."""

    method: str
    pages: int
    faults: int
    ready_s: float        # memory usable: eager after the copy, lazy after the handshake
    first_byte_s: float   # first byte read
    tenth_s: float        # a random 10% of the pages read
    total_s: float        # every page read
    verified_bytes: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    size_bytes: int
    runs: tuple[RestoreRun, ...]


def page_content(index: int) -> bytes:
    """The known content of page ``index``: a hash chain, different on every page.

    Every 8th page is left all zeros, as untouched guest memory is in real snapshots.
    """
    if index % 8 == 7:
        return bytes(PAGE_SIZE)
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    return seed * (PAGE_SIZE // len(seed))


def write_snapshot(path: str, size_bytes: int) -> None:
    """Write ``size_bytes`` of known page content to ``path`` (zero pages as holes)."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for index in range(size_bytes // PAGE_SIZE):
            data = page_content(index)
            if any(data):
                f.seek(index * PAGE_SIZE)
                f.write(data)


def _verify(read: Callable[[int, int], bytes], size_bytes: int, path: str) -> int:
    """Compare restored memory with the snapshot file chunk by chunk; return bytes checked."""
    with open(path, "rb") as f:
        for off in range(0, size_bytes, _CHUNK):
            want = f.read(min(_CHUNK, size_bytes - off))
            if read(off, len(want)) != want:
                raise IntegrityError(
                    f"restored memory differs from {path} in bytes 0x{off:x}-0x{off + len(want):x}")
    return size_bytes


def _touch_order(pages: int) -> list[int]:
    """A fixed random 10% of the pages first, then every page in order."""
    rng = random.Random(1234)
    return rng.sample(range(pages), max(1, pages // 10))


def _timed_touches(read: Callable[[int, int], bytes], size_bytes: int,
                   start: float) -> tuple[float, float, float]:
    """Read one byte, then a random tenth of the pages, then all; return the three times."""
    read(0, 1)
    first = time.perf_counter() - start
    for page in _touch_order(size_bytes // PAGE_SIZE):
        read(page * PAGE_SIZE, 1)
    tenth = time.perf_counter() - start
    for off in range(0, size_bytes, PAGE_SIZE):
        read(off, 1)
    return first, tenth, time.perf_counter() - start


def eager_restore(path: str, size_bytes: int) -> RestoreRun:
    """Read the whole snapshot into fresh memory, then touch and verify it."""
    start = time.perf_counter()
    with Mapping.anonymous(size_bytes) as mem, open(path, "rb", buffering=0) as f:
        view = mem.view()
        done = 0
        while done < size_bytes:
            n = f.readinto(view[done:])
            if not n:
                raise IntegrityError(f"{path} ended after {done} of {size_bytes} bytes")
            done += n
        del view
        ready = time.perf_counter() - start
        first, tenth, total = _timed_touches(mem.read, size_bytes, start)
        checked = _verify(mem.read, size_bytes, path)
    return RestoreRun("eager read()", size_bytes // PAGE_SIZE, 0, ready, first, tenth, total,
                      checked)


def lazy_restore(path: str, size_bytes: int, strategy: StrategyName) -> RestoreRun:
    """Restore through a pagein handler process; touch every page; verify every byte.

    The clock starts once the handler process is up (in a fleet it is a daemon that
    is already running when a VM restores); its start-up is not counted.
    """
    with restore_lazily(path, strategy=strategy) as restore:
        start = time.perf_counter()
        mem = restore.mapping
        first, tenth, total = _timed_touches(mem.read, size_bytes, start)
        checked = _verify(mem.read, size_bytes, path)
        faults = restore.stats().faults
    return RestoreRun(f"lazy, {strategy.value}", size_bytes // PAGE_SIZE, faults, 0.0, first,
                      tenth, total, checked)


DEMO_STRATEGIES = (StrategyName.ON_DEMAND, StrategyName.READAHEAD, StrategyName.POPULATE_ALL)


def run_demo(size_bytes: int = 256 << 20, workdir: str | None = None,
             strategies: tuple[StrategyName, ...] = DEMO_STRATEGIES) -> DemoResult:
    """Write a snapshot of ``size_bytes``, restore it eagerly and lazily, verify each."""
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise ValueError(f"demo size {size_bytes} must be a positive multiple of {PAGE_SIZE}")
    with tempfile.TemporaryDirectory(prefix="pagein-demo-", dir=workdir) as tmp:
        path = os.path.join(tmp, "memory.snap")
        write_snapshot(path, size_bytes)
        runs = [eager_restore(path, size_bytes)]
        runs += [lazy_restore(path, size_bytes, s) for s in strategies]
    return DemoResult(size_bytes, tuple(runs))
