"""The self-contained lazy-restore demo behind ``pagein demo``.

It writes a snapshot file of a memory region with known content, then restores it two
ways and verifies every byte of each:

- eager: ``read()`` the whole file into fresh anonymous memory, then use it;
- lazy: map empty memory, register it with userfaultfd and let a pagein handler in a
  separate process fill each page on first touch (:func:`pagein.serve.local.restore_lazily`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagein.errors import IntegrityError
from pagein.serve.local import restore_lazily
from pagein.sys.mapping import PAGE_SIZE, Mapping

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class RestoreRun:
    """One restore method's measurements."""

    method: str
    pages: int
    faults: int
    first_byte_s: float
    total_s: float
    verified_bytes: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    size_bytes: int
    snapshot_path: str
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
        first = time.perf_counter() - start
        _ = view[0]
        total = time.perf_counter() - start
        del view
        checked = _verify(mem.read, size_bytes, path)
    return RestoreRun("eager read()", size_bytes // PAGE_SIZE, 0, first, total, checked)


def lazy_restore(path: str, size_bytes: int) -> RestoreRun:
    """Restore through a pagein handler process; touch every page; verify every byte."""
    start = time.perf_counter()
    with restore_lazily(path) as restore:
        mem = restore.mapping
        mem.read(0, 1)
        first = time.perf_counter() - start
        for off in range(0, size_bytes, PAGE_SIZE):
            mem.read(off, 1)
        total = time.perf_counter() - start
        checked = _verify(mem.read, size_bytes, path)
        faults = restore.stats().faults
    return RestoreRun("lazy (pagein uffd)", size_bytes // PAGE_SIZE, faults, first, total, checked)


def run_demo(size_bytes: int = 256 << 20, workdir: str | None = None) -> DemoResult:
    """Write a snapshot of ``size_bytes``, restore it eagerly and lazily, verify both."""
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise ValueError(f"demo size {size_bytes} must be a positive multiple of {PAGE_SIZE}")
    with tempfile.TemporaryDirectory(prefix="pagein-demo-", dir=workdir) as tmp:
        path = os.path.join(tmp, "memory.snap")
        write_snapshot(path, size_bytes)
        runs = (eager_restore(path, size_bytes), lazy_restore(path, size_bytes))
    return DemoResult(size_bytes, path, runs)
