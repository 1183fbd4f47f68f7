"""Transparent huge pages of a process: collapse a range now, measure how much is huge.

:func:`collapse` is ``MADV_COLLAPSE`` (Linux 6.1+) through ``process_madvise(2)`` on the
process behind a pidfd (or on this process, with ``pidfd=None``): the kernel copies the
range's 512 small pages into one new 2 MiB page and maps it with one PMD, whatever the
THP sysfs setting says (``madvise`` here). What it refuses is a result, not an exception
(:class:`NotCollapsed` with the errno and a reason): on a range registered with
userfaultfd it never fills a missing page or the zero page itself, so a range the
handler has not wholly installed with data comes back ``EBUSY`` (measured:
benchmarks/collapse_probe.py, docs/serve.md "Huge pages after a lazy restore").

:func:`anon_huge_bytes` reads ``AnonHugePages`` of the mappings inside an address range
from ``/proc/PID/smaps``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pagein._abi import libc
from pagein._abi.mman import Advice

__all__ = ["HUGE_BYTES", "CollapseResult", "Collapsed", "NotCollapsed", "anon_huge_bytes",
           "collapse", "collapse_blocker"]

HUGE_BYTES = 2 << 20
#: /proc/PID/smaps is read whole; a VMM with more mappings than this is cut (bounded).
_SMAPS_MAX = 64 << 20

_REASONS = {
    errno.EBUSY: "a page of the range is missing or the zero page (the kernel does not "
                 "fill pages behind userfaultfd), or the memory cgroup is full",
    errno.EAGAIN: "a page of the range is busy (locked, pinned or not on the LRU yet)",
    errno.ENOMEM: "no free 2 MiB page could be allocated",
    errno.EINVAL: "the range cannot be a transparent huge page (registered for "
                  "userfaultfd write-protect, MADV_NOHUGEPAGE, not anonymous, or a kernel "
                  "before 6.1)",
    errno.ESRCH: "the process has exited",
    errno.EPERM: "collapsing another process's memory needs CAP_SYS_NICE and ptrace access",
}


@dataclass(frozen=True, slots=True)
class Collapsed:
    """The range is mapped by huge pages now."""

    length: int


@dataclass(frozen=True, slots=True)
class NotCollapsed:
    """The kernel refused; ``errno`` says why (see :attr:`reason`)."""

    errno: int

    @property
    def reason(self) -> str:
        return _REASONS.get(self.errno, os.strerror(self.errno))


CollapseResult = Collapsed | NotCollapsed


def collapse(pidfd: int | None, address: int, length: int) -> CollapseResult:
    """Collapse ``[address, address+length)`` of the pidfd's process (None: this one)
    into transparent huge pages (``MADV_COLLAPSE``; ``process_madvise(2)`` for another
    process). ``address`` and ``length`` should be 2 MiB-aligned: only the whole 2 MiB
    pieces inside the range are collapsed.

    The call copies every page (~2 MiB of memory traffic per piece) and holds the target's
    mmap lock for writing while it swaps the page tables, so faults of that process wait
    meanwhile. Safety: it changes no byte of the target's memory (the copy is exact); a
    REMOVE later inside the huge page splits it again.
    """
    if pidfd is None:
        ret = int(libc.madvise(address, length, int(Advice.COLLAPSE)))
        return Collapsed(length) if ret == 0 else NotCollapsed(libc.get_errno())
    ret = libc.process_madvise_one(pidfd, address, length, int(Advice.COLLAPSE))
    return Collapsed(ret) if ret >= 0 else NotCollapsed(libc.get_errno())


def anon_huge_bytes(pid: int, start: int, end: int) -> int:
    """``AnonHugePages`` of every mapping of ``pid`` that lies inside ``[start, end)``,
    in bytes, from ``/proc/PID/smaps`` (raises OSError when it cannot be read)."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        text = f.read(_SMAPS_MAX)
    total = 0
    inside = False
    for line in text.splitlines():
        head = line.split(b" ", 1)[0]
        if b"-" in head and not head.endswith(b":"):  # a mapping's first line: lo-hi perms
            lo_s, _, hi_s = head.partition(b"-")
            try:
                lo, hi = int(lo_s, 16), int(hi_s, 16)
            except ValueError:
                inside = False
                continue
            inside = start <= lo and hi <= end
        elif inside and line.startswith(b"AnonHugePages:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                total += int(parts[1]) * 1024
    return total


def collapse_blocker(pid: int, ranges: list[tuple[int, int]]) -> str | None:
    """Why the mappings of ``pid`` under ``ranges`` (``(start, end)`` pairs) cannot be
    collapsed by :func:`collapse`, or None when each is private anonymous memory that
    may hold transparent huge pages. Read from ``/proc/PID/smaps`` (raises OSError when
    it cannot be read): a shared or file mapping (a memfd, hugetlbfs, a page cache),
    ``MADV_NOHUGEPAGE`` (``nh``: the VMM's way to say no) or a userfaultfd
    write-protect registration (``uw``) each keep the range as it is.
    """
    with open(f"/proc/{pid}/smaps", "rb") as f:
        text = f.read(_SMAPS_MAX)
    where = ""
    covered = False
    for line in text.splitlines():
        head = line.split(b" ", 1)[0]
        if b"-" in head and not head.endswith(b":"):
            fields = line.split(maxsplit=5)
            where = ""
            lo_s, _, hi_s = head.partition(b"-")
            try:
                lo, hi = int(lo_s, 16), int(hi_s, 16)
            except ValueError:
                continue
            if not any(lo < end and start < hi for start, end in ranges):
                continue
            covered = True
            where = f"the mapping 0x{lo:x}-0x{hi:x}"
            path = fields[5].decode(errors="replace")[:80] if len(fields) > 5 else ""
            if len(fields) < 5 or fields[1][3:4] != b"p" or fields[4] != b"0" or path:
                return f"{where} is not private anonymous memory ({path or 'shared'})"
        elif where and line.startswith(b"VmFlags:"):
            flags = line.split()[1:]
            if b"nh" in flags:
                return f"{where} is marked MADV_NOHUGEPAGE"
            if b"uw" in flags:
                return f"{where} is registered for userfaultfd write-protect"
            if b"ht" in flags:
                return f"{where} is hugetlb memory (already huge pages)"
    return None if covered else "no mapping of the process covers the regions"
