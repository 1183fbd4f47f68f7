"""The Python fault engine: the reference implementation of the per-fault data plane.

It implements :class:`pagein.serve.engine.Engine` with the same rules as the native core
(:mod:`pagein.serve._core`), and is used when that is not built, with ``--engine
python``, and for sources that have no address to copy from (it reads them into a
bounce buffer). Ordering rules both engines keep:

- Every fill for a VM is issued from one thread. A REMOVE event (balloon,
  ``MADV_DONTNEED``) lets the kernel zap its range once it has been *read*; a fill
  decided before and issued after that would install stale snapshot bytes. So when a
  read returns any non-fault event, the engine serves none of that read's faults: it
  defers them and returns the events (:attr:`Reason.EVENTS`); the session marks the
  pages discarded (or moves the extents) and calls :meth:`run` again, which serves the
  deferred faults first — a fault racing a REMOVE of its page gets zeros.
- While a REMOVE/UNMAP/REMAP event is unread, every fill fails with EAGAIN. A fill that
  returns :class:`~pagein.sys.uffd.Retry` defers its fault and the ones after it; the
  next poll reads the event.
- EEXIST (:class:`~pagein.sys.uffd.AlreadyPresent`) means another fill won: the page is
  there but its waiters may sleep (only a successful fill wakes), so wake it. A fault
  is always filled, even when the bitmap says the page is present, so a duplicate fault
  (two vCPUs on one page) gets EEXIST and a wake, never a lost wakeup.
- On hugetlbfs the kernel also says EEXIST when the pool has no free huge page, though
  nothing was installed; believing it wakes a vCPU that faults again forever. So a
  hugetlb EEXIST is checked in the VMM's ``/proc/PID/pagemap`` (``pagemap_fd``) first,
  and a page that is not there fails the session with the pool hint
  (:func:`pagein.sys.mapping.hugetlb_pool_hint`). Every hugetlb EEXIST is checked: it is
  rare (vCPUs racing on a 2 MiB page), the check is one 8-byte ``pread``, and "only when
  the same page comes back" is defeated by two vCPUs alternating between two pages.
- No fill is issued once the source's tripwire is set (:mod:`pagein.serve.guard`: the
  memory file changed): the byte is read before every fill ioctl.
- Background fills use ``DONTWAKE`` and one ``UFFDIO_WAKE`` per contiguous piece they
  installed (:meth:`wake_installed`), never over a gap: a vCPU woken before its page is
  there faults again.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Sequence

from pagein._abi.uffd import UFFD_MSG_SIZE, EventType
from pagein.errors import UffdError
from pagein.serve.bitmap import Bitmap
from pagein.serve.cause import Cause
from pagein.serve.crash import CrashPoint, claim, countdown
from pagein.serve.engine import EventTuple, Reason, Unserved, pack_record
from pagein.serve.firecracker import Region
from pagein.serve.pagecache import CacheFiller
from pagein.serve.space import AddressSpace
from pagein.serve.stats import CounterBlock
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import Mapping, hugetlb_pool_hint
from pagein.sys.uffd import (
    AlreadyPresent,
    ContinueMode,
    CopyMode,
    Event,
    Filled,
    FillResult,
    Fork,
    PageFault,
    Remap,
    Remove,
    Retry,
    Unmap,
    Userfaultfd,
    ZeropageMode,
    decode_events,
)

__all__ = ["MIN_BULK_HOLE_PAGES", "PythonEngine"]

#: Holes at least this long (pages) become zero pages in bulk fills; shorter ones are copied.
MIN_BULK_HOLE_PAGES = 16
_BATCH = 128  # uffd messages per read()
_RECORDS_FULL = 65536
_HUGE = 2 * 1024 * 1024
_BYTES = {Cause.DEMAND: "bytes_fault", Cause.READAHEAD: "bytes_readahead",
          Cause.PREFETCH: "bytes_background", Cause.BACKGROUND: "bytes_background"}


def _after(cause: Cause) -> Cause:
    """The cause of the pages after the first chunk of a fill of ``cause``."""
    return Cause.READAHEAD if cause is Cause.DEMAND else cause


class _PeerGone(Exception):
    """ESRCH: the VMM's address space is gone."""


class PythonEngine:
    """Serve one VM's faults in Python. One thread uses it at a time."""

    def __init__(self, uffd: Userfaultfd, regions: Sequence[Region], filled: Sequence[Bitmap],
                 discarded: Sequence[Bitmap], holes: Sequence[Bitmap | None],
                 counters: CounterBlock, source: PageSource,
                 extents: Sequence[tuple[int, int, int, int]],
                 readahead_pages: Sequence[int], chunk_bytes: int, record: bool,
                 journal: memoryview | None = None, pagemap_fd: int = -1,
                 tripwire: bytearray | None = None, cache: CacheFiller | None = None) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk size {chunk_bytes} must be positive")
        self.uffd = uffd
        self.regions = tuple(regions)
        self.filled = list(filled)
        self.discarded = list(discarded)
        self.holes = list(holes)
        self.c = counters
        self.source = source
        self.readahead = list(readahead_pages)
        self.chunk = chunk_bytes
        self.record = record
        self._pagemap_fd = pagemap_fd  # the VMM's /proc/PID/pagemap, or -1; not ours to close
        self._tripwire = tripwire  # byte 0 turns 1 when the source changed (serve.guard)
        self.cache = cache  # --share-pages: data goes through the snapshot's page cache
        self.space = AddressSpace(self.regions)  # where the regions live: page math there
        self.space.set_extents(list(extents))
        # Messages are read into the VM's journal in shared memory when there is one (see
        # pagein.serve.state): an event stays on record until the session applied it.
        self._journal = journal
        self._dirty = False
        self._crash_fill = claim(CrashPoint.FILL)  # 0 unless a recovery test asks
        self._crash_event = claim(CrashPoint.EVENT)
        self._deferred: list[tuple[PageFault, int]] = []
        self._installed: list[tuple[int, int]] = []
        self._fault_records: list[bytes] = []
        self._fill_records: list[bytes] = []
        self._uffd_poll = select.poll()
        self._uffd_poll.register(uffd.fileno(), select.POLLIN)
        self._poller = self._uffd_poll
        self._poll_fds = (-1, -1)
        # hugetlbfs has no zero page: zeros are copied from memory never written. Also the
        # bounce buffer for sources that have no address to copy from.
        self._zeros = Mapping.anonymous(_HUGE)
        self._scratch = Mapping.anonymous(-(-max(chunk_bytes, _HUGE) // 4096) * 4096)

    # --- the interface ---------------------------------------------------------------

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def set_extents(self, extents: Sequence[tuple[int, int, int, int]]) -> None:
        self.space.set_extents(list(extents))

    def run(self, stop_fd: int, sock_fd: int,
            timeout_ms: int) -> tuple[int, list[EventTuple], list[Unserved]]:
        ufd = self.uffd.fileno()
        if self._poll_fds != (sock_fd, stop_fd):  # one poll set per session, not per call
            self._poller = select.poll()
            for fd in (ufd, sock_fd, stop_fd):
                if fd >= 0:
                    self._poller.register(fd, select.POLLIN)
            self._poll_fds = (sock_fd, stop_fd)
        poller = self._poller
        unserved: list[Unserved] = []
        if self._dirty:
            raise RuntimeError("run() before applied(): events would be lost")
        try:
            # The caller has applied the events that made these wait: retry them at once.
            # Later retries come only after a poll, which reads any event still pending.
            self._retry(unserved)
            while True:
                wait = timeout_ms
                if self._deferred:
                    wait = 1 if wait < 0 else min(wait, 1)
                ready = dict(poller.poll(wait))
                if stop_fd in ready:
                    return Reason.STOP, [], unserved
                uffd_ev = ready.get(ufd, 0)
                if uffd_ev & select.POLLERR:
                    return Reason.POLLERR, [], unserved
                if uffd_ev & select.POLLIN:
                    faults, events = self._drain()
                    self._deferred += faults
                    if events:
                        return Reason.EVENTS, events, unserved
                self._retry(unserved)
                if unserved:
                    return Reason.UNSERVED, [], unserved
                if sock_fd in ready:
                    return Reason.SOCKET, [], unserved
                if timeout_ms >= 0 and (not ready or timeout_ms == 0):
                    return Reason.IDLE, [], unserved
                if len(self._fault_records) + len(self._fill_records) >= _RECORDS_FULL:
                    return Reason.RECORDS, [], unserved
        except _PeerGone:
            return Reason.PEER_GONE, [], unserved

    def fill(self, region: int, first_page: int, pages: int, cause: int,
             dontwake: bool) -> bool:
        try:
            return self._fill(region, first_page, pages, Cause(cause), dontwake)
        except _PeerGone:
            raise UffdError("UFFDIO_COPY", errno.ESRCH, 0, 0, "the VMM has exited") from None

    def wake_installed(self) -> None:
        lo = hi = -1
        for a, n in sorted(self._installed):
            if a > hi:  # a gap: wake what came before it
                if hi > lo:
                    self.wake(lo, hi - lo)
                lo = a
            hi = max(hi, a + n)
        if hi > lo:
            self.wake(lo, hi - lo)
        self._installed = []

    def wake(self, start: int, length: int) -> None:
        self.uffd.wake(start, length)

    def drain(self, timeout_ms: int) -> list[EventTuple]:
        """Wait up to ``timeout_ms`` for messages; defer the faults, return the events."""
        if self._dirty:
            raise RuntimeError("drain() before applied(): events would be lost")
        if not self._uffd_poll.poll(timeout_ms):
            return []
        faults, events = self._drain()
        self._deferred += faults
        return events

    def take_records(self) -> tuple[bytes, bytes]:
        out = b"".join(self._fault_records), b"".join(self._fill_records)
        self._fault_records, self._fill_records = [], []
        return out

    def close(self) -> None:
        self._zeros.close()
        self._scratch.close()

    # --- reading -----------------------------------------------------------------------

    def _drain(self) -> tuple[list[tuple[PageFault, int]], list[EventTuple]]:
        """Read every pending message (many per read()); faults and other events apart."""
        faults: list[tuple[PageFault, int]] = []
        events: list[EventTuple] = []
        ready = True
        # Only read when poll says so: the VMM may have made the uffd blocking.
        while ready and not self._dirty:  # never overwrite events not yet applied
            batch = self._read()
            now = time.monotonic_ns()
            for ev in batch:
                match ev:
                    case PageFault():
                        faults.append((ev, now))
                    case Remove(start, end):
                        self.c.add("removes")
                        self.c.add("removed_bytes", end - start)
                        events.append((0x15, start, end, 0))
                    case Unmap(start, end):
                        self.c.add("unmaps")
                        events.append((0x16, start, end, 0))
                    case Remap(old, new, length):
                        self.c.add("remaps")
                        events.append((0x14, old, new, length))
                    case Fork(child):
                        events.append((0x13, child.detach(), 0, 0))
            # A short read emptied the queue; a full one may have left more behind.
            ready = len(batch) == _BATCH and bool(self._uffd_poll.poll(0))
        return faults, events

    def _retry(self, unserved: list[Unserved]) -> None:
        pending, self._deferred = self._deferred, []
        self._serve(pending, unserved)

    def _read(self) -> list[Event]:
        """One read() of up to a batch of messages (into the journal when there is one)."""
        j = self._journal
        if j is None:
            return self.uffd.read_events(_BATCH)
        n = self.uffd.readinto(j[:_BATCH * UFFD_MSG_SIZE])
        batch = decode_events(j[:n * UFFD_MSG_SIZE], features=self.uffd.api.features)
        for i in range(n):
            at = i * UFFD_MSG_SIZE
            if j[at] == EventType.PAGEFAULT:  # a waiting thread faults again: no record
                j[at:at + UFFD_MSG_SIZE] = bytes(UFFD_MSG_SIZE)
            else:
                self._dirty = True
        if self._crash_event and any(j[i * UFFD_MSG_SIZE] != EventType.PAGEFAULT
                                     for i in range(n)):
            self._crash_event = countdown(self._crash_event, CrashPoint.EVENT)
        return batch

    def applied(self) -> None:
        """The events :meth:`run`/:meth:`drain` returned are applied: clear the journal."""
        if self._journal is not None:
            self._journal[:] = bytes(len(self._journal))
        self._dirty = False

    def _serve(self, faults: list[tuple[PageFault, int]], unserved: list[Unserved]) -> None:
        for i, (fault, t0) in enumerate(faults):
            ok = self._serve_fault(fault, t0, unserved)
            if not ok:
                self.c.add("retries")
                self._deferred = faults[i:] + self._deferred
                return
            self.c.observe_latency((time.monotonic_ns() - t0) // 1000)

    # --- a fault -------------------------------------------------------------------------

    def _is_zero(self, ri: int, page: int) -> bool:
        holes = self.holes[ri]
        return self.discarded[ri].test(page) or (holes is not None and holes.test(page))

    def _serve_fault(self, fault: PageFault, t0: int, unserved: list[Unserved]) -> bool:
        """Fill the faulting page (and the forward run of its window); False = retry."""
        loc = self.space.locate(fault.address)
        if loc is None:
            unserved.append((fault.address, int(fault.write), fault.thread_id, t0))
            return True
        ri, page, dst, left = loc.region, loc.page, loc.page_address, loc.pages_left
        r = self.regions[ri]
        zero = self._is_zero(ri, page)
        per = self.readahead[ri]
        first = wpages = 0
        n = 1
        if per > 1:
            first = page - page % per
            wpages = min(per, r.pages - first)
            if not zero:
                n = self._forward(ri, page, min(first + wpages, page + left))
        # Always fill, even if the bitmap says the page is there: a duplicate fault
        # (two vCPUs) then gets EEXIST and a wake, never a lost wakeup.
        if not self._install(ri, dst, page, n, zero, Cause.DEMAND, False):
            return False
        self.c.add("faults")
        if self.record:
            self._fault_records.append(pack_record(time.monotonic_ns(), r.page_offset(page),
                                                   fault.thread_id, zero))
        if per > 1:
            self._fill(ri, first, wpages, Cause.READAHEAD, False)
        return True

    def _forward(self, ri: int, page: int, end: int) -> int:
        """How many pages from ``page`` to copy with it: the unfilled, undiscarded pages
        after it up to ``end`` and before a long hole. Copying them with the faulting page
        saves a sequential reader the next fault while the window fills."""
        stop = min(self.filled[ri].next_set(page + 1), self.discarded[ri].next_set(page + 1),
                   end)
        holes = self.holes[ri]
        if holes is not None and stop > page + 1:
            h = holes.next_set(page + 1)
            while h < stop:
                h_end = min(holes.next_clear(h), stop)
                if h_end - h >= MIN_BULK_HOLE_PAGES:
                    stop = h
                    break
                h = holes.next_set(h_end)
        return max(1, stop - page)

    # --- filling -------------------------------------------------------------------------

    def _fill(self, ri: int, first: int, pages: int, cause: Cause, dontwake: bool) -> bool:
        """Fill the unfilled live pages of a range; False on EAGAIN."""
        ps = self.regions[ri].page_size
        for address, p0, n in list(self.space.pieces(ri, first, pages)):
            for p, c in self.filled[ri].clear_runs(p0, p0 + n):
                for sp, sc, zero in self._segments(ri, p, c, cause):
                    dst = address + (sp - p0) * ps
                    if not self._install(ri, dst, sp, sc, zero, cause, dontwake):
                        return False
        return True

    def _segments(self, ri: int, page: int, count: int,
                  cause: Cause) -> list[tuple[int, int, bool]]:
        """Split a page run into ``(page, count, zero)``: discarded runs and holes of at
        least :data:`MIN_BULK_HOLE_PAGES` pages are zero; shorter holes are copied with
        their neighbours (one ioctl per hole costs more than a zero page saves). A
        recorded working set is copied as it is (PREFETCH): its few zero pages read as
        zeros from the file, and the lookups would double the cost of one-page runs."""
        disc = self.discarded[ri]
        holes = None if cause is Cause.PREFETCH else self.holes[ri]
        out: list[tuple[int, int, bool]] = []
        p, end = page, page + count
        while p < end:
            if disc.test(p):
                q = min(disc.next_clear(p), end)
                out.append((p, q - p, True))
            else:
                q = min(disc.next_set(p), end)
                out.extend(self._split_holes(holes, p, q))
            p = q
        return out

    @staticmethod
    def _split_holes(holes: Bitmap | None, p: int, q: int) -> list[tuple[int, int, bool]]:
        if holes is None:
            return [(p, q - p, False)]
        out: list[tuple[int, int, bool]] = []
        pos = p
        h = holes.next_set(p)
        while h < q:
            h_end = min(holes.next_clear(h), q)
            if h_end - h >= MIN_BULK_HOLE_PAGES:
                if h > pos:
                    out.append((pos, h - pos, False))
                out.append((h, h_end - h, True))
                pos = h_end
            h = holes.next_set(h_end) if h_end < q else q
        if pos < q:
            out.append((pos, q - pos, False))
        return out

    def _install(self, ri: int, dst: int, page: int, count: int, zero: bool, cause: Cause,
                 dontwake: bool) -> bool:
        """Install ``count`` pages at ``dst``, mark them filled; False on EAGAIN."""
        ps = self.regions[ri].page_size
        while count:
            n = min(count, max(1, self.chunk // ps))
            try:
                res = self._one(ri, dst, page, n, zero, dontwake)
            except UffdError as e:
                if e.errno == errno.ESRCH:
                    raise _PeerGone from e
                if e.errno != errno.ENOENT:
                    raise
                # The range was unmapped behind us (no UNMAP event asked for): nothing to fill.
                self.filled[ri].set(page, count)
                return True
            match res:
                case Filled(done):
                    k = done // ps
                    if self._crash_fill and k:  # installed, not yet marked filled
                        self._crash_fill = countdown(self._crash_fill, CrashPoint.FILL)
                case AlreadyPresent(done):
                    # The page at `done` exists (a racing fill won): skip it, and wake its
                    # waiters, which only a successful fill would have woken.
                    k = done // ps
                    self._account(ri, page, k, zero, cause)
                    if ps != 4096:
                        self._check_present(dst + k * ps, ps)
                    if dontwake and k:
                        self._installed.append((dst, k * ps))
                    self.filled[ri].set(page + k)
                    self.uffd.wake(dst, (k + 1) * ps)
                    self.c.add("eexist")
                    dst, page, count = dst + (k + 1) * ps, page + k + 1, count - k - 1
                    cause = _after(cause)
                    continue
                case Retry(done) if done >= ps:
                    # A partial copy ran into a page installed meanwhile (the kernel says
                    # EAGAIN, not EEXIST, once some pages are in): go on from there; if an
                    # event is really pending, the next ioctl does nothing and says so.
                    k = done // ps
                case Retry():
                    return False
            self._account(ri, page, k, zero, cause)
            if dontwake and k:
                self._installed.append((dst, k * ps))
            dst, page, count = dst + k * ps, page + k, count - k
            cause = _after(cause)
        return True

    def _check_present(self, address: int, page_size: int) -> None:
        """Raise unless the VMM has the huge page at ``address`` (see the module docstring).

        An unreadable pagemap (none given, the VMM gone) believes the kernel: the next
        ioctl then says ESRCH.
        """
        if self._pagemap_fd < 0:
            return
        try:
            raw = os.pread(self._pagemap_fd, 8, address // 4096 * 8)
        except OSError:
            return
        if len(raw) == 8 and not int.from_bytes(raw, "little") >> 63:
            raise UffdError("UFFDIO_COPY", errno.ENOMEM, address, page_size,
                            f"the kernel said EEXIST but the VMM has no page there: "
                            f"{hugetlb_pool_hint(page_size)}")

    def _account(self, ri: int, page: int, k: int, zero: bool, cause: Cause) -> None:
        """Count ``k`` pages installed from ``page``. DEMAND is the faulting page only:
        the pages copied with it in the same fill count as READAHEAD."""
        if not k:
            return
        if cause is Cause.DEMAND and k > 1:
            self._account(ri, page, 1, zero, cause)
            page, k, cause = page + 1, k - 1, Cause.READAHEAD
        self.filled[ri].set(page, k)
        self.c.add("pages", k)
        if zero:
            self.c.add("zero_pages", k)
        else:
            self.c.add(_BYTES[cause], k * self.regions[ri].page_size)
        if self.record:
            self._fill_records.append(pack_record(
                time.monotonic_ns(), self.regions[ri].page_offset(page), k,
                Cause.ZERO if zero else cause))

    def _one(self, ri: int, dst: int, page: int, n: int, zero: bool,
             dontwake: bool) -> FillResult:
        r = self.regions[ri]
        ps = r.page_size
        length = n * ps
        if self._tripwire is not None and self._tripwire[0]:
            raise UffdError("UFFDIO_COPY", errno.ESTALE, dst, length,
                            "the memory file changed while it was served: not filling")
        if zero and ps == 4096:
            return self.uffd.zeropage(dst, length,
                                      ZeropageMode.DONTWAKE if dontwake else ZeropageMode.NONE)
        mode = CopyMode.DONTWAKE if dontwake else CopyMode.NONE
        if zero:  # hugetlbfs has no zero page: copy from a zero buffer, one page at a time
            return self.uffd.copy(dst, self._zeros.address, ps, mode)
        if self.cache is not None:
            return self._from_cache(r.page_offset(page), dst, length, dontwake)
        off = r.page_offset(page)
        src = self.source.address_of(off, length)
        if src is None:
            view = self._scratch.view()
            try:
                self.source.read_into(off, view[:length])
            finally:
                view.release()
            src = self._scratch.address
        return self.uffd.copy(dst, src, length, mode)

    def _from_cache(self, offset: int, dst: int, length: int, dontwake: bool) -> FillResult:
        """Map snapshot pages of a shared clone (``--share-pages``): put them in the
        snapshot's page cache once (any clone's earlier fault may have), then
        ``UFFDIO_CONTINUE`` maps the cache pages themselves, read-only: the clone's
        writes copy on write, its clean pages stay shared. Zeros (holes, removed pages)
        never come here: those are private zero pages, so a REMOVE never reads the
        cache's snapshot bytes again."""
        assert self.cache is not None
        self.cache.ensure(self.source, offset, length)
        return self.uffd.continue_(dst, length,
                                   ContinueMode.DONTWAKE if dontwake else ContinueMode.NONE)
