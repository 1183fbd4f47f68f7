"""One VM's fault-serving loop: read uffd events, fill pages, keep the bookkeeping right.

Ordering rules this loop depends on (see ``ioctl_userfaultfd(2)`` and DESIGN.md):

- Every fill for a VM is issued from this one thread. A REMOVE event (balloon,
  ``MADV_DONTNEED``) is queued before the kernel zaps the range, and the zap happens only
  after we have *read* the event; a fill issued after reading it would land after the
  zap and show stale snapshot bytes. Because the same thread that reads events also
  marks the range discarded before its next fill, that cannot happen.
- While a REMOVE/UNMAP/REMAP event is unread, every fill fails with EAGAIN. So a fill
  that returns :class:`~pagein.sys.uffd.Retry` defers its fault, the loop drains all
  events, then retries.
- EEXIST (:class:`~pagein.sys.uffd.AlreadyPresent`) means another fill won the race:
  the page is there but its waiters may still sleep (only a successful fill wakes), so
  wake the range.
- Non-fault events of one read are applied before that read's faults: a fault racing
  a REMOVE of its page gets zeros, which is what the guest asked for.
- Background work (prefetch plans) runs one bounded chunk per turn of the loop, after
  the faults that turn read, so a fault never queues behind more than one chunk: a
  demand fault jumps the queue of a working-set prefetch. A chunk may gather many
  small spans; it is installed with ``UFFDIO_COPY_MODE_DONTWAKE`` and woken with one
  ``UFFDIO_WAKE`` per contiguous piece it installed (never over a gap: a vCPU woken
  before its own page is there faults again, a costly round trip).
- A strategy's blocking plan (REAP) is installed before the first fault is served;
  events read meanwhile are applied, faults deferred until it is done.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from pagein.errors import PageinError, SourceError, UffdError
from pagein.serve.bitmap import Bitmap
from pagein.serve.firecracker import Region
from pagein.serve.record import Arrival
from pagein.serve.stats import Counters
from pagein.serve.strategies import Span, SpanKind, Strategy
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import (
    AlreadyPresent,
    CopyMode,
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
)

__all__ = ["STATS_REQUEST", "Session", "SessionEnd"]

log = logging.getLogger("pagein.serve")

#: A pagein extension on the VMM socket (Firecracker never sends anything after the
#: handshake): a client may send this line and gets one JSON line of counters back.
STATS_REQUEST = b'{"pagein": "stats"}\n'

DEFAULT_CHUNK_BYTES = 1 << 20
#: Holes at least this long (pages) become zero pages in bulk fills; shorter ones are copied.
MIN_BULK_HOLE_PAGES = 16
_HUGE = 2 * 1024 * 1024
_BATCH = 128  # uffd messages per read()
#: Spans per background chunk (a scattered working set is mostly one-page spans). Fewer
#: let a demand fault in sooner, but a vCPU that runs into the prefetch frontier then
#: blocks once per chunk (~100 us each on kvm_pvm): measured, 64 lost to 256.
_MAX_SPANS = 256


_ARRIVALS = {"readahead": Arrival.READAHEAD, "background": Arrival.BACKGROUND,
             "prefetch": Arrival.PREFETCH}


def _cause(kind: SpanKind) -> str:
    return "prefetch" if kind is SpanKind.PREFETCH else "background"


class SessionEnd(Enum):
    PEER_EXITED = "peer exited"
    STOPPED = "server stopping"
    FAILED = "failed"


class _PeerGone(Exception):
    """The VMM's address space is gone (ESRCH): end the session quietly."""


@dataclass(slots=True)
class _RegionState:
    region: Region
    filled: Bitmap  # installed, or needing no background work (removed/unmapped)
    discarded: Bitmap  # snapshot content void after REMOVE: serve zeros


@dataclass(slots=True)
class _Extent:
    """A live address range and the region bytes mapped there (moves on REMAP)."""

    address: int
    length: int
    region: int
    rel: int  # byte offset inside the region


class Session:
    """Serve one VM: its uffd, its regions, its strategy. Run :meth:`run` in a thread."""

    def __init__(self, *, uffd: Userfaultfd, sock: socket.socket, regions: Iterable[Region],
                 source: PageSource, strategy: Strategy, peer_pid: int, stop_fd: int,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, pending: bytes = b"") -> None:
        self.uffd = uffd
        self.sock = sock
        self.regions = tuple(regions)
        self.source = source
        self.strategy = strategy
        self.peer_pid = peer_pid
        self.counters = Counters()
        self.complete = False
        self.end: SessionEnd | None = None
        self._stop_fd = stop_fd
        self._chunk = chunk_bytes
        self._ctl = pending
        self._states = [_RegionState(r, Bitmap(r.size_bytes // r.page_size),
                                     Bitmap(r.size_bytes // r.page_size)) for r in self.regions]
        self._extents = sorted((_Extent(r.base_address, r.size_bytes, i, 0)
                                for i, r in enumerate(self.regions)), key=lambda e: e.address)
        self._starts = [e.address for e in self._extents]
        # Private anonymous memory never written: it reads as zeros, so it is the zero
        # source for hugetlbfs (which has no zero page) as well as the bounce buffer for
        # sources without an address. `_zeros` is never written.
        scratch = -(-max(chunk_bytes, _HUGE) // PAGE_SIZE) * PAGE_SIZE
        self._zeros = Mapping.anonymous(_HUGE)
        self._scratch = Mapping.anonymous(scratch)
        self._deferred: list[tuple[PageFault, int]] = []
        self._plan: Iterator[Span] = iter(())
        self._span: Span | None = None
        self._uffd_poll = select.poll()
        self._uffd_poll.register(uffd.fileno(), select.POLLIN)
        self.recorder = strategy.recorder
        self._fault_at: tuple[int, int] = (-1, -1)  # (region, page) being faulted on
        self._dontwake = False  # background fills: DONTWAKE, one wake per chunk
        self._installed: list[tuple[int, int]] = []  # (address, length) filled DONTWAKE

    # --- the loop ------------------------------------------------------------------

    def run(self) -> SessionEnd:
        """Serve until the VMM exits, the stop fd becomes readable, or a fatal error."""
        name = f"vm pid={self.peer_pid}"
        try:
            if self.recorder is not None:
                self.recorder.start()
            self._blocking()
            self._plan = iter(self.strategy.on_connect(self.regions))
            self.end = self._loop()
        except _PeerGone:
            self.end = SessionEnd.PEER_EXITED
        except (PageinError, OSError) as e:
            log.error("%s: serving stopped: %s; its guest is frozen on missing pages", name, e)
            self.end = SessionEnd.FAILED
        log.info("%s: session ended (%s): %d faults, %d pages, %d bytes copied, %d zero pages",
                 name, self.end.value, self.counters.faults, self.counters.pages,
                 self.counters.bytes_copied, self.counters.zero_pages)
        if self.recorder is not None:
            try:
                self.recorder.finish(self.source, self.regions)
            except (PageinError, OSError) as e:
                log.error("%s: %s", name, e)
        return self.end

    def _blocking(self) -> None:
        """Install the strategy's blocking plan (REAP) before serving any fault."""
        for span in self.strategy.blocking_plan(self.regions):
            while not self._fill(span.region, span.first_page, span.pages,
                                 _cause(span.kind)):
                # EAGAIN: an event is unread. Apply it; keep its faults for the loop.
                self.counters.retries += 1
                self._deferred += self._drain(bool(self._uffd_poll.poll(100)))

    def _loop(self) -> SessionEnd:
        poller = select.poll()
        ufd, sfd = self.uffd.fileno(), self.sock.fileno()
        poller.register(ufd, select.POLLIN)
        poller.register(sfd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        if self._ctl and not self._on_socket(b""):
            return SessionEnd.PEER_EXITED
        while True:
            busy = self._span is not None or self._has_plan()
            timeout = 1 if self._deferred else (0 if busy else None)
            uffd_ready = False
            for fd, ev in poller.poll(timeout):
                if fd == self._stop_fd:
                    return SessionEnd.STOPPED
                if fd == sfd and not self._on_socket(None):
                    return SessionEnd.PEER_EXITED
                if fd == ufd:
                    if ev & select.POLLERR:
                        raise UffdError("poll(uffd)", errno.EBADF, 0, 0,
                                        "the VMM never completed UFFDIO_API on this uffd")
                    uffd_ready = True
            self._serve_faults(self._drain(uffd_ready))
            # One bounded chunk per turn even when faults were served: with a vCPU that
            # faults all the time, background work would otherwise starve, and it fills
            # a page ~10x cheaper than a fault does. A fault waits behind one chunk at most.
            if not self._deferred:
                self._background_step()

    def _drain(self, ready: bool) -> list[tuple[PageFault, int]]:
        """Read every pending event; apply non-fault events now, return the faults."""
        faults: list[tuple[PageFault, int]] = []
        # Only read when poll says so: the VMM may have made the uffd blocking.
        while ready:
            now = time.monotonic_ns()
            events = self.uffd.read_events(_BATCH)
            for ev in events:
                match ev:
                    case PageFault():
                        faults.append((ev, now))
                    case Remove(start, end):
                        self._on_remove(start, end)
                    case Unmap(start, end):
                        self._on_unmap(start, end)
                    case Remap(old, new, length):
                        self._on_remap(old, new, length)
                    case Fork(child):
                        log.warning("vm pid=%d forked with the uffd; not serving the child",
                                    self.peer_pid)
                        child.close()
            # A short read emptied the queue; a full one may have left more behind.
            ready = len(events) == _BATCH and bool(self._uffd_poll.poll(0))
        return faults

    def _serve_faults(self, faults: list[tuple[PageFault, int]]) -> bool:
        """Serve deferred faults then new ones, in order; return whether any were served."""
        pending = self._deferred + faults
        self._deferred = []
        for i, (fault, t0) in enumerate(pending):
            if not self._serve_fault(fault):
                self.counters.retries += 1
                self._deferred = pending[i:]
                return i > 0
            self.counters.observe_latency((time.monotonic_ns() - t0) // 1000)
        return bool(pending)

    # --- faults --------------------------------------------------------------------

    def _serve_fault(self, fault: PageFault) -> bool:
        """Fill the faulting page (and the strategy's window); False means retry later."""
        loc = self._locate(fault.address)
        if loc is None:
            log.error("vm pid=%d: fault at 0x%x outside every region it registered; "
                      "that vCPU stays blocked", self.peer_pid, fault.address)
            return True
        ri, page, dst, left = loc
        self._fault_at = (ri, page)
        st = self._states[ri]
        if st.discarded.test(page):
            zero = True
        elif st.region.page_size == 4096:
            off = st.region.offset + page * 4096
            zero = bool(self.source.zero_extents(off, 4096))
        else:
            zero = False
        window = self.strategy.on_fault(self.regions, ri, page)
        n = 1
        if window is not None and not zero:
            n = self._forward(st, page, min(window.first_page + window.pages, page + left))
        # Always fill, even if the bitmap says the page is there: a duplicate fault
        # (two vCPUs) then gets EEXIST and a wake, never a lost wakeup.
        before = self.counters.bytes_fault
        if not self._install(st, dst, page, n, zero, "fault"):
            return False
        extra = self.counters.bytes_fault - before - st.region.page_size
        if extra > 0:  # the pages after the faulting one count as readahead
            self.counters.bytes_fault -= extra
            self.counters.bytes_readahead += extra
        self.counters.faults += 1
        if self.recorder is not None:
            self.recorder.fault(st.region.offset + page * st.region.page_size,
                                fault.thread_id, zero)
        if window is not None:
            self._fill(window.region, window.first_page, window.pages, "readahead")
        return True

    def _forward(self, st: _RegionState, page: int, end: int) -> int:
        """How many pages from ``page`` one copy can fill: the faulting page plus the
        unfilled, undiscarded pages after it up to ``end`` (and before a long hole).

        Copying them with the faulting page saves a sequential reader the second fault
        it would take on the next page while the rest of the window was being filled.
        """
        stop = min(st.filled.next_set(page + 1), st.discarded.next_set(page + 1), end)
        r = st.region
        if stop > page + 1 and r.page_size == 4096:
            start = r.offset + (page + 1) * 4096
            for hole, length in self.source.zero_extents(start, (stop - page - 1) * 4096):
                if length >= MIN_BULK_HOLE_PAGES * 4096:
                    stop = min(stop, max(page + 1, (hole - r.offset) // 4096))
                    break
        return max(1, stop - page)

    def _locate(self, address: int) -> tuple[int, int, int, int] | None:
        """Return (region, page, page address, pages left in the extent) for an address."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        e = self._extents[i]
        if address >= e.address + e.length:
            return None
        ps = self.regions[e.region].page_size
        page = (e.rel + address - e.address) // ps
        page_address = e.address + page * ps - e.rel
        return e.region, page, page_address, (e.address + e.length - page_address) // ps

    # --- filling -------------------------------------------------------------------

    def _pieces(self, ri: int, page: int, n: int, force: bool) -> Iterator[tuple[int, int, int]]:
        """Yield ``(address, page, count)`` for the live, unfilled parts of a page range."""
        st = self._states[ri]
        ps = st.region.page_size
        lo, hi = page * ps, (page + n) * ps
        for e in [e for e in self._extents if e.region == ri]:
            a, b = max(lo, e.rel), min(hi, e.rel + e.length)
            if a >= b:
                continue
            runs = [(a // ps, (b - a) // ps)] if force else st.filled.clear_runs(a // ps, b // ps)
            for p, c in runs:
                yield e.address + p * ps - e.rel, p, c

    def _segments(self, ri: int, page: int, count: int) -> list[tuple[int, int, bool]]:
        """Split a page run into ``(page, count, zero)`` pieces: discarded or hole = zero.

        Holes shorter than :data:`MIN_BULK_HOLE_PAGES` are copied with their neighbours
        (they read as zeros from the file): one ioctl per hole would cost more than the
        memory a zero page saves. Faults always map the zero page for a hole.
        """
        st = self._states[ri]
        r = st.region
        out: list[tuple[int, int, bool]] = []
        p, end = page, page + count
        while p < end:
            zero = st.discarded.test(p)
            q = min(st.discarded.next_clear(p) if zero else st.discarded.next_set(p), end)
            if zero or r.page_size != 4096:
                out.append((p, q - p, zero))
            else:
                out.extend(self._split_holes(r, p, q))
            p = q
        return out

    def _split_holes(self, r: Region, p: int, q: int) -> list[tuple[int, int, bool]]:
        ps = r.page_size
        out: list[tuple[int, int, bool]] = []
        pos = p
        for off, length in self.source.zero_extents(r.offset + p * ps, (q - p) * ps):
            z0 = (off - r.offset + ps - 1) // ps  # whole pages inside the hole only
            z1 = (off + length - r.offset) // ps
            if z1 - z0 < MIN_BULK_HOLE_PAGES:
                continue
            if z0 > pos:
                out.append((pos, z0 - pos, False))
            out.append((z0, z1 - z0, True))
            pos = z1
        if pos < q:
            out.append((pos, q - pos, False))
        return out

    def _fill(self, ri: int, page: int, n: int, cause: str, *, force: bool = False) -> bool:
        """Fill pages of region ``ri`` (unfilled ones unless ``force``); False on EAGAIN."""
        st = self._states[ri]
        ps = st.region.page_size
        for addr, p, c in list(self._pieces(ri, page, n, force)):
            # A recorded working set's pages are copied as they are (its few zero pages
            # read as zeros from the file): skipping the hole lookup halves the cost of
            # the many one-page runs a scattered working set has. Discarded pages are
            # marked filled, so `_pieces` never yields them.
            segments = [(p, c, False)] if cause == "prefetch" and not force else \
                self._segments(ri, p, c)
            for sp, sc, zero in segments:
                dst = addr + (sp - p) * ps
                if not self._install(st, dst, sp, sc, zero, cause):
                    return False
        return True

    def _install(self, st: _RegionState, dst: int, page: int, count: int, zero: bool,
                 cause: str) -> bool:
        """Install ``count`` pages at ``dst``; mark them filled; False on EAGAIN."""
        ps = st.region.page_size
        while count:
            n = min(count, max(1, self._chunk // ps))
            try:
                res = self._one(st.region, dst, page, n, zero)
            except UffdError as e:
                if e.errno == errno.ESRCH:
                    raise _PeerGone from e
                if e.errno != errno.ENOENT:
                    raise
                # The range was unmapped behind us (no UNMAP event asked for): nothing to fill.
                st.filled.set(page, count)
                return True
            match res:
                case Filled(done):
                    k = done // ps
                case AlreadyPresent(done):
                    # The page at `done` exists (a racing fill won): skip it, and wake its
                    # waiters, which only a successful fill would have woken.
                    k = done // ps
                    self._account(st, page, k, zero, cause)
                    st.filled.set(page + k)
                    self.uffd.wake(dst, (k + 1) * ps)
                    self.counters.eexist += 1
                    dst, page, count = dst + (k + 1) * ps, page + k + 1, count - k - 1
                    continue
                case Retry(done):
                    k = done // ps
                    self._account(st, page, k, zero, cause)
                    return False
            self._account(st, page, k, zero, cause)
            dst, page, count = dst + k * ps, page + k, count - k
        return True

    def _account(self, st: _RegionState, page: int, k: int, zero: bool, cause: str) -> None:
        if not k:
            return
        if self.recorder is not None:
            self._record(st, page, k, zero, cause)
        st.filled.set(page, k)
        c = self.counters
        c.pages += k
        nbytes = k * st.region.page_size
        if zero:
            c.zero_pages += k
        elif cause == "fault":
            c.bytes_fault += nbytes
        elif cause == "readahead":
            c.bytes_readahead += nbytes
        else:
            c.bytes_background += nbytes

    def _record(self, st: _RegionState, page: int, k: int, zero: bool, cause: str) -> None:
        assert self.recorder is not None
        ps = st.region.page_size
        off = st.region.offset + page * ps
        if zero:
            self.recorder.filled(off, k, Arrival.ZERO)
        elif cause == "fault":
            ri = self._states.index(st)
            if (ri, page) == self._fault_at:  # the faulting page, then its neighbours
                self.recorder.filled(off, 1, Arrival.DEMAND)
                off, k = off + ps, k - 1
            if k:
                self.recorder.filled(off, k, Arrival.READAHEAD)
        else:
            self.recorder.filled(off, k, _ARRIVALS[cause])

    def _one(self, r: Region, dst: int, page: int, n: int, zero: bool) -> FillResult:
        ps = r.page_size
        length = n * ps
        if self._dontwake:
            self._installed.append((dst, length))
        if zero and ps == 4096:
            if self._dontwake:
                return self.uffd.zeropage(dst, length, ZeropageMode.DONTWAKE)
            return self.uffd.zeropage(dst, length)
        if zero:  # hugetlbfs has no zero page: copy from a zero buffer, one page at a time
            return self.uffd.copy(dst, self._zeros.address, ps)
        off = r.offset + page * ps
        src = self.source.address_of(off, length)
        if src is None:
            view = self._scratch.view()
            try:
                self.source.read_into(off, view[:length])
            finally:
                view.release()
            src = self._scratch.address
        if self._dontwake:
            return self.uffd.copy(dst, src, length, CopyMode.DONTWAKE)
        return self.uffd.copy(dst, src, length)

    # --- background ----------------------------------------------------------------

    def _has_plan(self) -> bool:
        if self._span is None:
            self._span = next(self._plan, None)
            if self._span is None and not self.complete and all(
                    s.filled.full() for s in self._states):
                self.complete = True
                log.info("vm pid=%d: every page is populated; the source is no longer needed",
                         self.peer_pid)
        return self._span is not None

    def _background_step(self) -> None:
        """Fill one chunk of the plan: spans in order, up to the chunk size (populated
        pages skipped), with DONTWAKE and one wake over the range the chunk covered."""
        budget, spans = self._chunk, _MAX_SPANS
        self._dontwake = True
        self._installed = []
        try:
            while budget > 0 and spans and self._has_plan() and self._span is not None:
                spans -= 1
                s = self._span
                ps = self.regions[s.region].page_size
                n = min(s.pages, max(1, budget // ps))
                if not self._fill(s.region, s.first_page, n, _cause(s.kind)):
                    self.counters.retries += 1
                    return  # retried after the events are drained; filled pages are skipped
                budget -= n * ps
                rest = s.pages - n
                self._span = Span(s.region, s.first_page + n, rest, s.kind) if rest > 0 \
                    else None
                if rest > 0 and s.kind is SpanKind.BACKGROUND:
                    r = self.regions[s.region]
                    nxt = min(rest, max(1, self._chunk // ps))
                    self._prefetch(r, (s.first_page + n) * ps, nxt * ps)
        finally:
            self._dontwake = False
            self._wake_installed()

    def _wake_installed(self) -> None:
        """Wake what the chunk installed: one wake per contiguous piece, never a range
        with pages still missing (a thread woken there only faults again, and a vCPU
        chasing a prefetch would pay that round trip on every chunk)."""
        lo = hi = -1
        for a, n in sorted(self._installed):
            if a != hi:
                if hi > lo:
                    self._wake(lo, hi - lo)
                lo = a
            hi = a + n
        if hi > lo:
            self._wake(lo, hi - lo)
        self._installed = []

    def _wake(self, start: int, length: int) -> None:
        try:
            self.uffd.wake(start, length)
        except UffdError as e:
            if e.errno == errno.ESRCH:
                raise _PeerGone from e
            raise

    def _prefetch(self, r: Region, rel: int, length: int) -> None:
        try:
            self.source.prefetch(r.offset + rel, length)
        except SourceError as e:
            log.debug("prefetch hint failed: %s", e)

    # --- events --------------------------------------------------------------------

    def _overlaps(self, start: int, end: int) -> Iterator[tuple[_Extent, int, int]]:
        for e in self._extents:
            a, b = max(start, e.address), min(end, e.address + e.length)
            if a < b:
                yield e, a, b

    def _on_remove(self, start: int, end: int) -> None:
        c = self.counters
        c.removes += 1
        c.removed_bytes += end - start
        for e, a, b in list(self._overlaps(start, end)):
            st = self._states[e.region]
            ps = st.region.page_size
            p0 = (e.rel + a - e.address + ps - 1) // ps
            p1 = (e.rel + b - e.address) // ps
            if p1 > p0:
                st.discarded.set(p0, p1 - p0)
                st.filled.set(p0, p1 - p0)  # nothing to copy there any more

    def _on_unmap(self, start: int, end: int) -> None:
        self.counters.unmaps += 1
        for e, a, b in list(self._overlaps(start, end)):
            st = self._states[e.region]
            ps = st.region.page_size
            p0, p1 = (e.rel + a - e.address) // ps, (e.rel + b - e.address) // ps
            st.filled.set(p0, p1 - p0)
        self._cut(start, end)

    def _on_remap(self, old: int, new: int, length: int) -> None:
        self.counters.remaps += 1
        moved = [_Extent(new + a - old, b - a, e.region, e.rel + a - e.address)
                 for e, a, b in self._overlaps(old, old + length)]
        self._cut(old, old + length)
        self._extents = sorted(self._extents + moved, key=lambda e: e.address)
        self._starts = [e.address for e in self._extents]

    def _cut(self, start: int, end: int) -> None:
        out: list[_Extent] = []
        for e in self._extents:
            e_end = e.address + e.length
            if e_end <= start or e.address >= end:
                out.append(e)
                continue
            if e.address < start:
                out.append(_Extent(e.address, start - e.address, e.region, e.rel))
            if e_end > end:
                out.append(_Extent(end, e_end - end, e.region, e.rel + end - e.address))
        self._extents = out
        self._starts = [e.address for e in out]

    # --- the socket ----------------------------------------------------------------

    def _on_socket(self, data: bytes | None) -> bool:
        """Handle bytes from the VMM socket; False on EOF (the VMM exited)."""
        if data is None:
            try:
                data = self.sock.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                return False
        self._ctl += data
        while b"\n" in self._ctl:
            line, _, self._ctl = self._ctl.partition(b"\n")
            if line.strip() == STATS_REQUEST.strip():
                reply = json.dumps(self.counters.snapshot().to_dict()).encode() + b"\n"
                self.sock.sendall(reply)
            else:
                log.warning("vm pid=%d: ignoring unexpected %d bytes on the socket",
                            self.peer_pid, len(line))
        if len(self._ctl) > 4096:
            self._ctl = b""
        return True

    def close(self) -> None:
        """Close the uffd, the socket and the buffers (idempotent)."""
        self.uffd.close()
        self.sock.close()
        self._zeros.close()
        self._scratch.close()
