"""Huge pages after a lazy restore: collapse each wholly installed 2 MiB range of a VM.

Every uffd fill installs 4 KiB pages, so a lazily restored guest runs on 4 KiB host
mappings, where a guest that never left memory (or one restored by copy into memory
advised ``MADV_HUGEPAGE``) may run on 2 MiB ones; on a shadow-paged host every TLB miss
is expensive. Once the session has installed every page of a 2 MiB-aligned range (a
prefetch, populate-all or readahead did), it asks the kernel to remap that range with
one huge page: ``MADV_COLLAPSE`` through ``process_madvise(2)`` on the VMM's pidfd
(:func:`pagein.sys.thp.collapse`), from the serving thread, the same for both engines.

What makes it safe (measured on Linux 6.18, ``benchmarks/collapse_probe.py``):

- Only a range whose ``filled`` bits are all set and whose ``discarded`` bits are all
  clear is asked, after the events read so far are applied (the session calls
  :meth:`Collapser.turn` after :meth:`~pagein.serve.session.Session._apply`). A range
  with a page a REMOVE discarded (it reads zeros, maybe served by the zero page) is
  never asked, nor one with a hole of the memory file (served by the zero page).
- The kernel checks again under its own locks: on a userfaultfd-registered range it
  refuses (EBUSY) a range with a missing pte or the zero page instead of filling it, so
  a REMOVE that lands between the check and the collapse cannot be papered over. A
  REMOVE inside a collapsed huge page splits it; the zapped page faults to the handler
  again, which answers zeros.
- The copy is exact: the huge page holds the bytes the 512 small pages held.

Cost: about one 2 MiB copy (0.7-1 ms here, the same as the ``UFFDIO_COPY`` that filled
it) while the VMM's mmap lock is held for the swap; one collapse per turn of the serving
loop, so a fault waits behind at most one. Ranges are scanned for completeness when 512
pages more have been installed, or when the VM has been quiet for ``IDLE_MS``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
from collections import deque
from dataclasses import dataclass

from pagein.serve.bitmap import Bitmap
from pagein.serve.space import AddressSpace
from pagein.serve.state import VmState
from pagein.sys.fdpass import peer_credentials, peer_pidfd
from pagein.sys.thp import HUGE_BYTES, Collapsed, collapse, collapse_blocker

__all__ = ["HUGE_PAGES", "IDLE_MS", "Collapser", "HugeRange", "huge_ranges", "ready"]

log = logging.getLogger("pagein.serve")

HUGE_PAGES = HUGE_BYTES // 4096  # 4 KiB pages in one 2 MiB range
#: How long the VM must be quiet (no fault) before ranges completed by faults and
#: readahead are looked for (the engine serves faults without returning to the session);
#: doubled after each quiet look that found nothing new, up to IDLE_MAX_MS, so an idle
#: VM with ranges it never completes costs a wakeup every 2 s, not 20 a second.
IDLE_MS = 50
IDLE_MAX_MS = 2000
_TRIES = 3  # EAGAIN (a page busy, not on the LRU yet) is tried again this often
_FULL_RUN = re.compile(rb"\xff{64,}")


@dataclass(frozen=True, slots=True)
class HugeRange:
    """The 2 MiB-aligned address ``address`` holds pages ``[first_page, +512)`` of
    4 KiB region ``region``."""

    region: int
    first_page: int
    address: int


def huge_ranges(space: AddressSpace) -> list[HugeRange]:
    """Every 2 MiB-aligned range wholly inside a live extent of a 4 KiB region."""
    out: list[HugeRange] = []
    for e in space.extents:
        if space.regions[e.region].page_size != 4096:
            continue  # hugetlb: already huge pages
        a = -(-e.address // HUGE_BYTES) * HUGE_BYTES
        while a + HUGE_BYTES <= e.end:
            out.append(HugeRange(e.region, (e.rel + a - e.address) // 4096, a))
            a += HUGE_BYTES
    return out


def ready(r: HugeRange, filled: Bitmap, discarded: Bitmap, holes: Bitmap | None) -> bool:
    """Whether every page of ``r`` is installed with snapshot data: all filled, none
    discarded by a REMOVE, none a hole of the file (those are the zero page)."""
    p, n = r.first_page, HUGE_PAGES
    return (filled.count_range(p, n) == n and discarded.count_range(p, n) == 0
            and (holes is None or holes.count_range(p, n) == 0))


def _full_blocks(bits: Bitmap) -> set[int]:
    """Indices of the 64-byte blocks (512 pages) whose bits are all set, found in C."""
    out: set[int] = set()
    for m in _FULL_RUN.finditer(bits.buffer):
        out.update(range((m.start() + 63) // 64, m.end() // 64))
    return out


class Collapser:
    """Collapse one VM's completed ranges; :meth:`turn` does at most one per call.

    Owned by the session's serving thread (the one that applies events), which makes
    every readiness check see the REMOVEs read so far. Owns ``pidfd``.
    """

    def __init__(self, pidfd: int, space: AddressSpace, state: VmState,
                 holes: list[Bitmap | None], name: str) -> None:
        self._pidfd = pidfd
        self._space = space
        self._state = state
        self._holes = holes
        self.name = name
        self._done: set[tuple[int, int]] = set()  # (region, first page) asked for good
        self._tries: dict[tuple[int, int], int] = {}
        self._todo: list[HugeRange] = []
        self._ready: deque[HugeRange] = deque()
        self._seen = -1  # pages installed at the last scan
        self._idle_ms = IDLE_MS
        # A worker taking over from a dead one cannot tell the ranges it collapsed from
        # those it did not: those complete at the first look are collapsed again (a
        # no-op for a huge page) but not counted again.
        self._takeover = state.attaches > 1
        self._uncounted: set[HugeRange] = set()
        self._stopped = False
        self.moved()

    @classmethod
    def open(cls, sock: socket.socket | None, space: AddressSpace, state: VmState,
             holes: list[Bitmap | None], name: str) -> Collapser | None:
        """A collapser for the VMM at the other end of ``sock`` (found by its pidfd,
        ``SO_PEERPIDFD``), or None, with one INFO line saying why, when there is none."""
        if sock is None:
            log.info("%s: not collapsing filled ranges into huge pages: no VMM socket to "
                     "find the VMM by", name)
            return None
        pid = peer_credentials(sock).pid
        return cls.of_process(pid, peer_pidfd(sock, pid), space, state, holes, name)

    @classmethod
    def of_process(cls, pid: int, pidfd: int, space: AddressSpace, state: VmState,
                   holes: list[Bitmap | None], name: str) -> Collapser | None:
        """A collapser of process ``pid`` (``pidfd``, now owned here), or None (the pidfd
        closed, one INFO line saying why) when its guest memory cannot or must not be
        collapsed: hugetlb, shared or file memory, or marked ``MADV_NOHUGEPAGE``."""
        ranges = [(e.address, e.end) for e in space.extents
                  if space.regions[e.region].page_size == 4096]
        why = None
        if pidfd < 0:
            why = f"no pidfd of pid {pid}"
        elif not ranges:
            why = "its memory is hugetlb already"
        elif not huge_ranges(space):
            why = "no 2 MiB-aligned range in its regions"
        else:
            try:
                why = collapse_blocker(pid, ranges)
                signal.pidfd_send_signal(pidfd, 0)  # still that process: its pid not reused
            except OSError as e:
                why = f"cannot read its mappings: {e.strerror}"
        if why is not None:
            if pidfd >= 0:
                os.close(pidfd)
            log.info("%s: not collapsing filled ranges into huge pages: %s", name, why)
            return None
        return cls(pidfd, space, state, holes, name)

    def moved(self) -> None:
        """The live extents changed (UNMAP/REMAP, or at start): list the ranges again."""
        live = [r for r in huge_ranges(self._space) if (r.region, r.first_page) not in self._done]
        keep = set(live)
        self._ready = deque(r for r in self._ready if r in keep)
        queued = set(self._ready)
        self._todo = [r for r in live if r not in queued]
        self._seen = -1

    @property
    def backlog(self) -> bool:
        """Whether a completed range waits to be collapsed (the loop must not block)."""
        return bool(self._ready) and not self._stopped

    @property
    def idle_ms(self) -> int:
        """How long the loop may wait for faults before the next look (-1: for ever, no
        range is left to find)."""
        return self._idle_ms if self._todo and not self._stopped else -1

    def turn(self, *, idle: bool) -> None:
        """Look for completed ranges when enough was installed (or the VM is ``idle``),
        then collapse at most one. Call only with every event read so far applied."""
        if self._stopped:
            return
        pages = self._state.counters.get("pages")
        if idle:  # back off while nothing new is installed
            self._idle_ms = IDLE_MS if pages != self._seen else min(2 * self._idle_ms,
                                                                    IDLE_MAX_MS)
        if self._todo and pages != self._seen and (idle or pages - self._seen >= HUGE_PAGES
                                                   or self._seen < 0):
            self._scan()
            self._seen = pages
        while self._ready:
            r = self._ready.popleft()
            st = self._state
            # Checked again now: a REMOVE applied since the scan voids the range.
            if not ready(r, st.filled[r.region], st.discarded[r.region],
                         self._holes[r.region]):
                self._done.add((r.region, r.first_page))
                continue
            self._collapse(r)
            return

    def _scan(self) -> None:
        st = self._state
        full = [_full_blocks(b) for b in st.filled]
        left: list[HugeRange] = []
        for r in self._todo:
            aligned = r.first_page % HUGE_PAGES == 0
            maybe = (r.first_page // HUGE_PAGES in full[r.region]) if aligned else True
            if maybe and ready(r, st.filled[r.region], st.discarded[r.region],
                               self._holes[r.region]):
                self._ready.append(r)
                if self._takeover:
                    self._uncounted.add(r)
            else:
                left.append(r)
        self._todo = left
        self._takeover = False

    def _collapse(self, r: HugeRange) -> None:
        key = (r.region, r.first_page)
        result = collapse(self._pidfd, r.address, HUGE_BYTES)
        counters = self._state.counters
        if isinstance(result, Collapsed):
            self._done.add(key)
            if r not in self._uncounted:
                counters.add("collapsed")
            return
        if result.errno == errno.EAGAIN and self._tries.get(key, 0) + 1 < _TRIES:
            self._tries[key] = self._tries.get(key, 0) + 1
            self._ready.append(r)  # busy now: after the others
            return
        self._done.add(key)
        self._tries.pop(key, None)
        if result.errno == errno.ESRCH:
            self._stopped = True  # the VMM is gone; the session learns it on its own
            return
        counters.add("collapse_failed")
        if counters.get("collapse_failed") == 1:  # once per VM: a reason, not a flood
            log.info("%s: the kernel did not collapse 0x%x-0x%x into a huge page: %s "
                     "(errno %d); further refusals are only counted", self.name, r.address,
                     r.address + HUGE_BYTES, result.reason, result.errno)
        if result.errno in (errno.EINVAL, errno.EPERM):
            self._stopped = True  # the same for every range of this VM: stop asking

    def close(self) -> None:
        """Close the pidfd (idempotent)."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._stopped = True
