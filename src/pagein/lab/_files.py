"""Scratch files for the experiments: a snapshot file with a known pattern, cleaned up."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from pagein.lab._probe import MIB, PAGE_SIZE

__all__ = ["pattern_page", "scratch_file", "snapshot_bytes"]


def pattern_page(index: int, tag: int) -> bytes:
    """One page whose bytes name its index and a tag, so misplaced pages are caught."""
    head = f"page {index:08d} tag {tag:02x} ".encode()
    return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]


def snapshot_bytes(size_bytes: int, tag: int = 0x5A) -> bytes:
    """The content of a test snapshot: every page distinct."""
    return b"".join(pattern_page(i, tag) for i in range(size_bytes // PAGE_SIZE))


@contextmanager
def scratch_file(data: bytes | None = None, *, size_bytes: int = 0,
                 directory: str | None = None) -> Iterator[int]:
    """Create a file (on disk, under /var/tmp or ``directory``), yield its fd, remove it.

    With ``data`` the file holds those bytes, synced to disk; otherwise it is a sparse
    file of ``size_bytes`` (all holes).
    """
    fd, path = tempfile.mkstemp(prefix="pagein-lab-", dir=directory or _disk_tmp())
    try:
        os.unlink(path)  # nothing to clean up if we are killed
        if data is not None:
            for off in range(0, len(data), 4 * MIB):
                os.pwrite(fd, data[off:off + 4 * MIB], off)
            os.fsync(fd)
        else:
            os.ftruncate(fd, size_bytes)
        yield fd
    finally:
        os.close(fd)


def _disk_tmp() -> str:
    # Page-cache behaviour (cold reads, holes) needs a disk file system, not tmpfs.
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
