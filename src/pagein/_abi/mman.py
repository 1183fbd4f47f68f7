"""``<sys/mman.h>``, ``<linux/memfd.h>`` and ``/proc/PID/pagemap`` constants (x86-64)."""

from __future__ import annotations

import enum


class Prot(enum.IntFlag):
    NONE = 0
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4


class MapFlag(enum.IntFlag):
    SHARED = 0x01
    PRIVATE = 0x02
    FIXED = 0x10
    ANONYMOUS = 0x20
    NORESERVE = 0x4000
    POPULATE = 0x8000
    HUGETLB = 0x40000
    FIXED_NOREPLACE = 0x100000
    HUGE_2MB = 21 << 26
    HUGE_1GB = 30 << 26


class MremapFlag(enum.IntFlag):
    MAYMOVE = 1
    FIXED = 2
    DONTUNMAP = 4


class Advice(enum.IntEnum):
    NORMAL = 0
    RANDOM = 1
    SEQUENTIAL = 2
    WILLNEED = 3
    DONTNEED = 4
    FREE = 8
    REMOVE = 9
    DONTFORK = 10
    DOFORK = 11
    MERGEABLE = 12
    HUGEPAGE = 14
    NOHUGEPAGE = 15
    DONTDUMP = 16
    COLD = 20
    PAGEOUT = 21
    POPULATE_READ = 22
    POPULATE_WRITE = 23
    COLLAPSE = 25  # Linux 6.1+: make this range a transparent huge page now


class MemfdFlag(enum.IntFlag):
    CLOEXEC = 0x0001
    ALLOW_SEALING = 0x0002
    HUGETLB = 0x0004
    HUGE_2MB = 21 << 26


MAP_FAILED = (1 << 64) - 1

# /proc/PID/pagemap: one little-endian u64 per virtual page
# (Documentation/admin-guide/mm/pagemap.rst).
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63
PAGEMAP_ENTRY_BYTES = 8
