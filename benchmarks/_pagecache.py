"""Page-cache control shared by the benchmarks: make a file cold or warm before a row."""

from __future__ import annotations

import os


def drop_cache(path: str) -> None:
    """Evict the file's clean, unmapped pages from the page cache (cold-cache rows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: str) -> None:
    """Read the whole file once so every page of it is in the page cache (warm rows)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
