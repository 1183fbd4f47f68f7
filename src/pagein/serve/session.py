"""One VM's serving loop: the fault engine serves, the session decides everything else.

The per-fault work is the engine's (:mod:`pagein.serve.engine`: native or Python, both
keeping the ordering rules written in :mod:`pagein.serve.install`). The session:

- applies the events the engine hands back — REMOVE marks pages discarded (a later
  fault reads zeros) before the engine serves any fault read with it; UNMAP and REMAP
  move the live extents (:mod:`pagein.serve.space`) and hand them to the engine;
- runs the strategy: its blocking plan (REAP) before the first fault is served (events
  read meanwhile are applied, faults deferred), then its background plan one bounded
  chunk per turn (:mod:`pagein.serve.plan`): ``run`` then returns after one batch of
  faults, so a fault never waits behind more than one chunk;
- answers the VMM socket (pagein's stats request; EOF means the VMM exited);
- drains the engine's fault records into the :class:`~pagein.serve.record.Recorder`.

Its state — filled and discarded pages, counters — lives in the VM's
:class:`~pagein.serve.state.VmState`, shared with the supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Iterable
from enum import Enum

from pagein.errors import PageinError, UffdError
from pagein.serve.bitmap import Bitmap
from pagein.serve.collapse import Collapser
from pagein.serve.engine import (
    CoreEvent,
    Engine,
    EngineName,
    EventTuple,
    Reason,
    Unserved,
    decode_records,
)
from pagein.serve.firecracker import Region, uffd_pollerr_reason
from pagein.serve.guard import SourceGuard
from pagein.serve.install import PythonEngine
from pagein.serve.options import DEFAULT_CHUNK_BYTES
from pagein.serve.pagecache import CacheFiller
from pagein.serve.plan import Planner
from pagein.serve.ratelog import RateLimitedLog
from pagein.serve.record import Recorder
from pagein.serve.recovery import journal_events
from pagein.serve.space import AddressSpace
from pagein.serve.state import VmState
from pagein.serve.stats import N_COUNTERS
from pagein.serve.strategies import PopulateAll, Strategy
from pagein.snapshot.source import PageSource
from pagein.sys.uffd import Userfaultfd

__all__ = ["DEFAULT_CHUNK_BYTES", "STATS_REQUEST", "Nudge", "Session", "SessionEnd", "choose",
           "holes_of", "native_unavailable"]

log = logging.getLogger("pagein.serve")

#: A pagein extension on the VMM socket (Firecracker never sends anything after the
#: handshake): a client may send this line and gets one JSON line of counters back.
STATS_REQUEST = b'{"pagein": "stats"}\n'
_MAX_CTL = 4096  # bytes of an unfinished control line kept
# What a VMM can trigger again and again (garbage on its socket, faults outside its
# regions) is logged at most 5 times per 10 s per VM, 100 for all VMs of this process.
_PEER_LOG = RateLimitedLog(log, lines=5, interval_s=10.0, total_lines=100)


class SessionEnd(Enum):
    PEER_EXITED = "peer exited"
    STOPPED = "server stopping"
    FAILED = "failed"


class Nudge:
    """A session's stop fd that says more than stop: :meth:`populate` asks a running
    session to fill every page it is missing now (a drain: the server is going and the
    VM must not need it), :meth:`stop` to end. Each sets its flag, then makes the
    eventfd readable; the session, woken, reads it and acts on the flags (so a flag
    set while it acts is seen on its next wake)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stop_wanted = False
        self.populate_wanted = False

    def stop(self) -> None:
        self.stop_wanted = True
        self._poke()

    def populate(self) -> None:
        self.populate_wanted = True
        self._poke()

    def _poke(self) -> None:
        if self.fd >= 0:
            os.eventfd_write(self.fd, 1)

    def take(self) -> None:
        """Make the fd unreadable again (the session has seen the flags)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def holes_of(source: PageSource, regions: Iterable[Region]) -> list[Bitmap | None]:
    """Per region, the 4 KiB pages that are all zeros in the source (file holes)."""
    out: list[Bitmap | None] = []
    for r in regions:
        if r.page_size != 4096:
            out.append(None)
            continue
        bits = Bitmap(r.pages)
        for off, length in source.zero_extents(r.offset, r.size_bytes):
            first = (off - r.offset + 4095) // 4096  # whole pages inside the hole only
            last = (off + length - r.offset) // 4096
            if last > first:
                bits.set(first, last - first)
        out.append(bits if bits.next_set(0) < bits.size else None)
    return out



def native_unavailable() -> str | None:
    """Why the native core cannot be used here, or None when it can."""
    try:
        from pagein.serve import _core
    except ImportError as e:
        return (f"the native fault core is not built ({e}); reinstall pagein with gcc and "
                "the Python headers present (scripts/install.sh does)")
    if N_COUNTERS != _core.N_COUNTERS:
        return "the native fault core was built from another version of pagein: reinstall"
    return None


def choose(wanted: EngineName) -> tuple[EngineName, str | None]:
    """Return the engine to use for ``wanted`` and, when it differs, why.

    Both engines' modules are imported with this one (the Python engine is every
    session's fallback), so the first VM's first fault does not wait for an import.
    """
    if wanted is EngineName.NATIVE:
        why = native_unavailable()
        if why is not None:
            return EngineName.PYTHON, why
        import pagein.serve.native  # noqa: F401
    return wanted, None


class Session:
    """Serve one VM: its uffd, its regions, its strategy. Run :meth:`run` in a thread.

    The session uses the uffd and the VMM socket (None: there is none, e.g. a VMM serving
    itself) but does not own them: whoever handed them over closes them. Nor does it own
    ``pagemap_fd``, the VMM's ``/proc/PID/pagemap`` (-1: none), which the engines read
    to check a hugetlb EEXIST (:mod:`pagein.serve.install`).
    """

    def __init__(self, *, uffd: Userfaultfd, sock: socket.socket | None,
                 regions: Iterable[Region],
                 source: PageSource, strategy: Strategy, state: VmState, name: str,
                 stop_fd: int, engine: EngineName = EngineName.NATIVE,
                 recorder: Recorder | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 pending: bytes = b"", resume: bool = False, pagemap_fd: int = -1,
                 guard: SourceGuard | None = None, cache: CacheFiller | None = None,
                 collapse: bool = False, nudge: Nudge | None = None) -> None:
        self.uffd = uffd
        self.sock = sock
        self.space = AddressSpace(tuple(regions))
        self.regions = self.space.regions
        self.source = source
        self.strategy = strategy
        self.state = state
        self.counters = state.counters
        self.name = name
        self.recorder = recorder
        self.resume = resume
        self.end: SessionEnd | None = None
        self._stop_fd = stop_fd
        self._nudge = nudge  # stop_fd is nudge.fd: readable means stop or populate
        self._populating = False
        self._chunk = chunk_bytes
        self._ctl = pending
        self._done_logged = False
        self._pagemap_fd = pagemap_fd
        self.guard = guard
        tripwire = None if guard is None else guard.tripwire
        self.cache = cache
        saved = state.load_extents()
        if saved is not None:  # a worker before this one moved them (UNMAP/REMAP)
            self.space.set_extents(saved)
        self._holes: list[Bitmap | None] = []
        self.engine_name, self._engine = self._open_engine(engine, tripwire)
        # Huge pages for wholly installed 2 MiB ranges (pagein.serve.collapse). Not for a
        # VM mapping the shared page cache: its pages are the cache's, not its own.
        self.collapser = (Collapser.open(sock, self.space, state, self._holes, name)
                          if collapse and cache is None else None)

    def _open_engine(self, wanted: EngineName,
                     tripwire: bytearray | None) -> tuple[EngineName, Engine]:
        holes = self._holes = holes_of(self.source, self.regions)
        windows = [self.strategy.window_pages(r) for r in self.regions]
        st = self.state
        record = self.recorder is not None
        extents = self.space.extent_tuples()
        if wanted is EngineName.NATIVE:
            base, overlay = self.source.address_map()
            if base is not None:
                from pagein.serve.native import NativeEngine  # needs the built C core
                return EngineName.NATIVE, NativeEngine(
                    self.uffd.fileno(), self.regions, st.filled, st.discarded, holes,
                    st.counters, base, overlay, extents, windows, self._chunk, record,
                    st.journal, self._pagemap_fd, tripwire, self.cache)
            log.info("%s: %s has no mapping to copy from; serving with the python engine",
                     self.name, self.source.describe())
        return EngineName.PYTHON, PythonEngine(
            self.uffd, self.regions, st.filled, st.discarded, holes, st.counters, self.source,
            extents, windows, self._chunk, record, st.journal, self._pagemap_fd, tripwire,
            self.cache)

    @property
    def complete(self) -> bool:
        """Whether every page is installed (the source is no longer needed)."""
        return self.state.complete()

    # --- the loop ------------------------------------------------------------------

    def run(self) -> SessionEnd:
        """Serve until the VMM exits, the stop fd becomes readable, or a fatal error."""
        try:
            if self.recorder is not None:
                self.recorder.start()
            if self.guard is not None and self.guard.check() is not None:
                raise UffdError("UFFDIO_COPY", errno.ESTALE, 0, 0, "not serving")
            if self.resume:
                self._take_over()
            self._blocking()
            planner = Planner(self.strategy.on_connect(self.regions), self.regions,
                              self.source, self.counters, self._chunk)
            self.end = self._loop(planner)
        except (PageinError, OSError) as e:
            changed = None
            if self.guard is not None and self.guard.check() is not None:
                changed = self.guard.message()
            if isinstance(e, UffdError) and e.errno == errno.ESRCH:
                self.end = SessionEnd.PEER_EXITED  # the VMM's address space is gone
            elif changed is not None:
                # Whatever the fill said (ESTALE from the tripwire, EFAULT from a truncated
                # mapping), the cause is the file: say that.
                log.error("%s: serving stopped: %s; its guest is frozen on missing pages",
                          self.name, changed)
                self.end = SessionEnd.FAILED
            else:
                log.error("%s: serving stopped: %s; its guest is frozen on missing pages",
                          self.name, e)
                self.end = SessionEnd.FAILED
        finally:
            self._records()
        _PEER_LOG.flush(self.name)
        c = self.counters.snapshot()
        log.info("%s: session ended (%s): %d faults, %d pages, %d bytes copied, %d zero pages",
                 self.name, self.end.value, c.faults, c.pages, c.bytes_copied, c.zero_pages)
        if self.recorder is not None:
            for error in self.recorder.finish(self.source, self.regions):
                log.error("%s: %s", self.name, error)  # one line per file not written
        return self.end

    def _take_over(self) -> None:
        """Go on where a dead worker stopped (see :mod:`pagein.serve.recovery`): apply the
        events it had read but not applied, then wake every live range once, so each
        thread blocked on a fault it had read faults again, now to us."""
        events = journal_events(self.state.journal)
        if events:
            log.warning("%s: applying %d event(s) the previous worker had read", self.name,
                        len(events))
        self._apply(events)  # and clear the journal (fault slots included)
        for e in self.space.extents:
            self._engine.wake(e.address, e.length)

    def _blocking(self) -> None:
        """Install the strategy's blocking plan (REAP) before serving any fault."""
        for span in self.strategy.blocking_plan(self.regions):
            while not self._engine.fill(span.region, span.first_page, span.pages, span.cause,
                                        False):
                # EAGAIN: an event is unread. Apply it; its faults wait for the loop.
                self.counters.add("retries")
                self._apply(self._engine.drain(100))

    def _loop(self, planner: Planner) -> SessionEnd:
        sfd = -1 if self.sock is None else self.sock.fileno()
        if self._ctl and not self._on_socket(b""):
            return SessionEnd.PEER_EXITED
        busy = planner.busy()
        while True:
            timeout = self._timeout(busy)
            reason, events, unserved = self._engine.run(self._stop_fd, sfd, timeout)
            if events:
                self._apply(events)
            if unserved:
                self._unserved(unserved)
            self._records()
            if reason == Reason.STOP:
                if self._nudge is None or self._nudge.stop_wanted:
                    return SessionEnd.STOPPED
                self._nudge.take()
                if self._nudge.populate_wanted and not self._populating:
                    planner = self._populate_all()
                    busy = planner.busy()
                    if not busy:
                        self._log_complete()
            if reason == Reason.SOCKET and not self._on_socket(None):
                return SessionEnd.PEER_EXITED
            if reason == Reason.PEER_GONE:
                return SessionEnd.PEER_EXITED
            if reason == Reason.POLLERR:
                raise UffdError("poll(uffd)", errno.EBADF, 0, 0,
                                uffd_pollerr_reason(self.uffd.fileno()))
            # One bounded chunk per turn even when faults were served: with a vCPU that
            # faults all the time, background work would otherwise starve, and it fills
            # a page ~10x cheaper than a fault does. A fault waits behind one chunk at most.
            stepped = True
            if busy and not self._engine.deferred:
                stepped = planner.step(self._engine)
                busy = planner.busy()
                if not busy:
                    self._log_complete()
            # After the events read so far are applied (above) and never while a fill
            # waits on an unread one (EAGAIN): a range is judged on current bitmaps.
            if self.collapser is not None and stepped and not self._engine.deferred:
                self.collapser.turn(idle=reason == Reason.IDLE and timeout > 0)

    def _timeout(self, busy: bool) -> int:
        """How long the engine may wait for faults: not at all while a plan or a
        collapse waits, a moment while ranges may have completed, else until woken."""
        c = self.collapser
        if busy or (c is not None and c.backlog):
            return 0
        return -1 if c is None else c.idle_ms

    def _populate_all(self) -> Planner:
        """Fill every page still missing, in the background, faults first (a drain).

        Replaces the strategy's plan, which it covers: pages already in place are
        skipped, so whatever the plan had done is not done again."""
        self._populating = True
        missing = sum(r.size_bytes for r in self.regions) - sum(
            f.count * r.page_size for f, r in zip(self.state.filled, self.regions, strict=True))
        log.info("%s: the server is draining: populating the %d bytes still missing",
                 self.name, max(0, missing))
        return Planner(PopulateAll().on_connect(self.regions), self.regions, self.source,
                       self.counters, self._chunk)

    def _log_complete(self) -> None:
        if not self._done_logged and self.complete:
            self._done_logged = True
            log.info("%s: every page is populated; the source is no longer needed", self.name)

    # --- what the engine hands back ------------------------------------------------

    def _apply(self, events: list[EventTuple]) -> None:
        """Apply non-fault events, in the order read, before any later fill."""
        st = self.state
        moved = False
        for code, a, b, n in events:
            # The engine counted the events when it read them.
            if code == CoreEvent.REMOVE:
                for pr in self.space.pages_of(a, b, whole=True):
                    st.discarded[pr.region].set(pr.first, pr.count)
                    st.filled[pr.region].set(pr.first, pr.count)  # nothing to copy there
            elif code == CoreEvent.UNMAP:
                for pr in self.space.unmap(a, b):
                    st.filled[pr.region].set(pr.first, pr.count)
                moved = True
            elif code == CoreEvent.REMAP:
                self.space.remap(a, b, n)
                moved = True
            elif code == CoreEvent.FORK:
                log.warning("%s forked with the uffd; not serving the child", self.name)
                if a >= 0:
                    os.close(a)
        if moved:
            extents = self.space.extent_tuples()
            self.state.save_extents(extents)  # before the journal forgets the event
            self._engine.set_extents(extents)
            if self.collapser is not None:
                self.collapser.moved()
        self._engine.applied()

    def _unserved(self, faults: list[Unserved]) -> None:
        _PEER_LOG.log(logging.ERROR, self.name, self.name, "%d fault(s) outside every region "
                      "it registered (first at 0x%x); those threads stay blocked",
                      len(faults), faults[0][0])

    def _records(self) -> None:
        if self.recorder is None:
            return
        faults, fills = decode_records(*self._engine.take_records())
        for f in faults:
            self.recorder.fault_at(f.t_ns, f.offset, f.thread_id, f.zero)
        for g in fills:
            self.recorder.filled_at(g.t_ns, g.offset, g.pages, g.cause)

    # --- the socket ----------------------------------------------------------------

    def _on_socket(self, data: bytes | None) -> bool:
        """Handle bytes from the VMM socket; False on EOF (the VMM exited)."""
        if self.sock is None:
            return True
        if data is None:
            try:
                data = self.sock.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                return False
        self._ctl += data
        ignored = 0
        while b"\n" in self._ctl:
            line, _, self._ctl = self._ctl.partition(b"\n")
            if line.strip() == STATS_REQUEST.strip():
                self._reply(json.dumps(self.stats_dict()).encode() + b"\n")
            else:
                ignored += len(line) + 1
        if len(self._ctl) > _MAX_CTL:
            ignored += len(self._ctl)
            self._ctl = b""
        if ignored:  # a peer may send garbage forever: rate-limited, never echoed
            _PEER_LOG.log(logging.WARNING, self.name, self.name,
                          "ignoring %d unexpected bytes on the socket", ignored)
        return True

    def _reply(self, data: bytes) -> None:
        """Answer a stats request without ever blocking: a VMM that asks and never reads
        must not stop its own faults being served. What does not fit is dropped."""
        if self.sock is None:
            return
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0
        if sent < len(data):
            _PEER_LOG.log(logging.WARNING, self.name, self.name, "dropped %d bytes of a stats "
                          "reply: the VMM does not read its socket", len(data) - sent)

    def stats_dict(self) -> dict[str, object]:
        d = self.counters.snapshot().to_dict()
        d["engine"] = self.engine_name.value
        return d

    def close(self) -> None:
        """Close the engine and the collapser's pidfd (idempotent); the uffd, the socket
        and the state stay open."""
        self._engine.close()
        if self.collapser is not None:
            self.collapser.close()

