"""``/proc/PID/pagemap``: what backs each virtual page of a process.

One little-endian u64 per page (``Documentation/admin-guide/mm/pagemap.rst``)::

    bit 63 present   62 swapped   61 file-page or shared-anon   57 uffd-wp
    bit 56 exclusively mapped     55 soft-dirty                 0-54 PFN (root only)
"""

from __future__ import annotations

import array
import os
import signal
from dataclasses import dataclass

from pagein._abi.mman import (
    PAGEMAP_ENTRY_BYTES,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
)
from pagein.sys._fd import OwnedFd
from pagein.sys.mapping import PAGE_SIZE, Mapping

__all__ = ["PageInfo", "Pagemap", "PagemapSummary", "clear_soft_dirty", "open_peer_pagemap"]


@dataclass(frozen=True, slots=True)
class PageInfo:
    """One page's pagemap entry, decoded."""

    present: bool
    swapped: bool
    file_or_shared: bool
    uffd_wp: bool
    exclusive: bool
    soft_dirty: bool
    pfn: int  # 0 unless the reader has CAP_SYS_ADMIN

    @classmethod
    def decode(cls, entry: int) -> PageInfo:
        return cls(bool(entry & PM_PRESENT), bool(entry & PM_SWAP), bool(entry & PM_FILE),
                   bool(entry & PM_UFFD_WP), bool(entry & PM_MMAP_EXCLUSIVE),
                   bool(entry & PM_SOFT_DIRTY),
                   entry & PM_PFN_MASK if entry & PM_PRESENT else 0)


@dataclass(frozen=True, slots=True)
class PagemapSummary:
    """Counts over a range of pages."""

    pages: int
    present: int
    swapped: int
    file_or_shared: int
    exclusive: int
    soft_dirty: int
    uffd_wp: int
    distinct_pfns: int


class Pagemap(OwnedFd):
    """An open ``/proc/PID/pagemap`` (``pid`` defaults to this process)."""

    def __init__(self, pid: int | None = None) -> None:
        super().__init__(os.open(f"/proc/{pid or 'self'}/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        self.pid = pid or os.getpid()

    def entries(self, start: int, length: int) -> array.array[int]:
        """Return the raw u64 entries for the pages of ``[start, start+length)``."""
        first = start // PAGE_SIZE
        n = (start + length + PAGE_SIZE - 1) // PAGE_SIZE - first
        data = os.pread(self.fileno(), n * PAGEMAP_ENTRY_BYTES, first * PAGEMAP_ENTRY_BYTES)
        out = array.array("Q")
        out.frombytes(data)
        return out

    def pages(self, start: int, length: int) -> list[PageInfo]:
        """Return one decoded :class:`PageInfo` per page of the range."""
        return [PageInfo.decode(e) for e in self.entries(start, length)]

    def summary(self, start: int, length: int) -> PagemapSummary:
        """Count present, swapped, shared, exclusive, soft-dirty and uffd-wp pages."""
        es = self.entries(start, length)
        pfns = {e & PM_PFN_MASK for e in es if e & PM_PRESENT and e & PM_PFN_MASK}
        return PagemapSummary(
            pages=len(es),
            present=sum(1 for e in es if e & PM_PRESENT),
            swapped=sum(1 for e in es if e & PM_SWAP),
            file_or_shared=sum(1 for e in es if e & PM_FILE),
            exclusive=sum(1 for e in es if e & PM_MMAP_EXCLUSIVE),
            soft_dirty=sum(1 for e in es if e & PM_SOFT_DIRTY),
            uffd_wp=sum(1 for e in es if e & PM_UFFD_WP),
            distinct_pfns=len(pfns),
        )


def soft_dirty_supported() -> bool:
    """Return whether this kernel tracks soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY``).

    Probed by writing a fresh page: the kernel marks new pages soft-dirty when it
    tracks them at all. Without it, bit 55 always reads 0.
    """
    with Mapping.anonymous(PAGE_SIZE) as m, Pagemap() as pm:
        m.write(0, b"\1")
        return pm.pages(m.address, PAGE_SIZE)[0].soft_dirty


def clear_soft_dirty(pid: int | None = None) -> None:
    """Clear the soft-dirty bits of every page of a process (``echo 4 > clear_refs``).

    A no-op on kernels without ``CONFIG_MEM_SOFT_DIRTY`` (see :func:`soft_dirty_supported`).
    """
    with open(f"/proc/{pid or 'self'}/clear_refs", "w") as f:
        f.write("4")


def open_peer_pagemap(pid: int, pidfd: int) -> int:
    """Open ``/proc/PID/pagemap`` of the process behind ``pidfd``; return the fd, or -1.

    The fd reads the address space of the process that had ``pid`` when it was opened; the
    pidfd, signalled with 0 after the open, proves that was still the peer and not a
    later process that reused its PID. Without a pidfd (-1) nothing proves it: -1.
    Reading another process's pagemap needs ptrace access to it (root has it).
    """
    if pidfd < 0:
        return -1
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        os.close(fd)
        return -1
    return fd
