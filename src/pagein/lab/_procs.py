"""The other processes of an experiment: a peer that shares guest memory, a fault handler.

Both are forked (not spawned), so they inherit the experiment's fds and mappings: the
peer maps the same memfd shared, the handler reads snapshot bytes at the addresses the
parent mapped before forking and issues ioctls on the inherited uffd.

Why a separate handler process: a Python thread that faults on uffd-registered memory
blocks holding the GIL, so a handler thread of the same process could never run. A
uffd acts on the memory of the process that created it, so the forked handler's fills
land in the parent's address space.

Every wait has a timeout and every child is killed in ``close()`` if it did not exit,
so a broken experiment fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import selectors
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from time import perf_counter_ns
from typing import Any, Protocol, Self

from pagein.errors import PageinError
from pagein.lab._probe import PAGE_SIZE, page_crcs, page_pfns, read_each_page
from pagein.sys.mapping import Mapping
from pagein.sys.uffd import (
    AlreadyPresent,
    Filled,
    FillResult,
    PageFault,
    Remove,
    Retry,
    Unmap,
    Userfaultfd,
)

__all__ = [
    "WAIT_S",
    "ContinuePolicy",
    "CopyPolicy",
    "FaultHandler",
    "HandlerStats",
    "Peer",
    "Policy",
    "ZeroPolicy",
]

WAIT_S = 30.0  # the longest any experiment waits for another process
_ctx = multiprocessing.get_context("fork")


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(WAIT_S)


# --- the peer: a second process mapping the same memfd --------------------------------


def _peer_main(conn: Connection, fd: int, length: int) -> None:
    m = Mapping.of_fd(fd, length, shared=True)
    handlers: dict[str, Any] = {
        "address": lambda: m.address,
        "touch": lambda: read_each_page(m.address, m.length),
        "crcs": lambda: page_crcs(m.address, m.length),
        "pfns": lambda: page_pfns(m.address, m.length),
        "read": m.read,
        "write": m.write,
    }
    try:
        while conn.poll(WAIT_S):
            cmd, args = conn.recv()
            if cmd == "quit":
                return
            try:
                conn.send(("ok", handlers[cmd](*args)))
            except (PageinError, ValueError, OSError) as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        m.release()  # the process exits; the kernel unmaps


class Peer:
    """A second process that maps the same memfd shared: the vhost-user backend's role.

    It touches its mapping only when asked, so it never faults in pages before the
    experiment wants it to.
    """

    def __init__(self, fd: int, length: int) -> None:
        self._conn, child = _ctx.Pipe()
        self._proc = _ctx.Process(target=_peer_main, args=(child, fd, length), daemon=True)
        self._proc.start()
        child.close()
        self.length = length
        self.pid: int = self._proc.pid or 0
        try:
            self.address: int = self._call("address")
        except BaseException:
            self.close()
            raise

    def _call(self, cmd: str, *args: object) -> Any:
        try:
            self._conn.send((cmd, args))
            if not self._conn.poll(WAIT_S):
                raise PageinError(f"the peer process {self.pid} did not answer {cmd!r} "
                                  f"within {WAIT_S:.0f} s")
            status, value = self._conn.recv()
        except (OSError, EOFError) as e:
            raise PageinError(f"the peer process {self.pid} is gone (on {cmd!r})") from e
        if status != "ok":
            raise PageinError(f"the peer process failed on {cmd!r}: {value}")
        return value

    def touch(self) -> None:
        """Read one byte of every page of the peer's mapping."""
        self._call("touch")

    def crcs(self) -> tuple[int, ...]:
        return tuple(self._call("crcs"))

    def pfns(self) -> tuple[int, ...]:
        return tuple(self._call("pfns"))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._call("read", offset, length))

    def write(self, offset: int, data: bytes) -> None:
        self._call("write", offset, data)

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):  # it may be exiting on its own
                self._conn.send(("quit", ()))
        _stop(self._proc)
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the fault handler ----------------------------------------------------------------


class Policy(Protocol):
    """How a handler fills a faulting page and what it remembers of REMOVE events."""

    def fill(self, uffd: Userfaultfd, page: int, counts: Counter[str]) -> FillResult: ...

    def removed(self, start: int, end: int) -> None: ...


@dataclass(slots=True)
class CopyPolicy:
    """Fill by ``UFFDIO_COPY`` from snapshot bytes at ``source`` (an address in the handler).

    ``balloon_aware``: after a REMOVE, fill pages of the removed range with zeros (what
    a correct handler must do) instead of the stale snapshot page.

    Safety: ``source`` is read in the handler process and must cover the registered
    range starting at ``base``; it stays valid there because the handler is forked
    after the caller mapped it.
    """

    base: int
    source: int
    balloon_aware: bool = True
    _removed: list[tuple[int, int]] = field(default_factory=list)

    def fill(self, uffd: Userfaultfd, page: int, counts: Counter[str]) -> FillResult:
        if self.balloon_aware and any(s <= page < e for s, e in self._removed):
            counts["zero_fills"] += 1
            return uffd.zeropage(page, PAGE_SIZE)
        counts["copies"] += 1
        return uffd.copy(page, self.source + (page - self.base), PAGE_SIZE)

    def removed(self, start: int, end: int) -> None:
        self._removed.append((start, end))


@dataclass(slots=True)
class ContinuePolicy:
    """Fill MINOR faults by ``UFFDIO_CONTINUE``: map the page cache page, copy nothing."""

    def fill(self, uffd: Userfaultfd, page: int, counts: Counter[str]) -> FillResult:
        counts["continues"] += 1
        return uffd.continue_(page, PAGE_SIZE)

    def removed(self, start: int, end: int) -> None:
        pass


@dataclass(slots=True)
class ZeroPolicy:
    """Fill every fault with zeros: ``UFFDIO_ZEROPAGE``, or a copy of a zero buffer."""

    zero_buffer: int = 0  # an address of PAGE_SIZE zero bytes in the handler; 0: ZEROPAGE

    # Safety: zero_buffer is read by the kernel in the handler process (mapped before fork).

    def fill(self, uffd: Userfaultfd, page: int, counts: Counter[str]) -> FillResult:
        if self.zero_buffer:
            counts["copies"] += 1
            return uffd.copy(page, self.zero_buffer, PAGE_SIZE)
        counts["zero_fills"] += 1
        return uffd.zeropage(page, PAGE_SIZE)

    def removed(self, start: int, end: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class HandlerStats:
    """What the handler process saw and did."""

    faults: int = 0
    removes: int = 0
    unmaps: int = 0
    copies: int = 0
    continues: int = 0
    zero_fills: int = 0
    already_present: int = 0
    retries: int = 0
    fill_ns: int = 0  # time in the fill calls (ctypes + ioctl + waking the faulting thread)


def _serve_batch(uffd: Userfaultfd, policy: Policy, faults: list[PageFault],
                 counts: Counter[str]) -> list[PageFault]:
    """Fill each fault; return the ones to retry (EAGAIN: events arrived meanwhile)."""
    again: list[PageFault] = []
    for f in faults:
        page = f.address & ~(PAGE_SIZE - 1)
        t0 = perf_counter_ns()
        result = policy.fill(uffd, page, counts)
        counts["fill_ns"] += perf_counter_ns() - t0
        match result:
            case Filled():
                pass
            case AlreadyPresent():
                # The ioctl wakes only on success: the faulting thread still sleeps.
                counts["already_present"] += 1
                uffd.wake(page, PAGE_SIZE)
            case Retry():
                counts["retries"] += 1
                again.append(f)
    return again


def _serve_until_stopped(uffd: Userfaultfd, policy: Policy, stop_fd: int,
                         counts: Counter[str]) -> bool:
    """The handler's loop; return False when it gave up waiting (nothing for WAIT_S)."""
    sel = selectors.DefaultSelector()
    sel.register(uffd.fileno(), selectors.EVENT_READ, "uffd")
    sel.register(stop_fd, selectors.EVENT_READ, "stop")
    deferred: list[PageFault] = []
    while True:
        ready = sel.select(timeout=0 if deferred else WAIT_S)
        if any(key.data == "stop" for key, _ in ready):
            return True
        if not ready and not deferred:
            return False
        faults, deferred = deferred, []
        # Read every pending event before filling: while a REMOVE is unread, every fill
        # fails with EAGAIN, and a page removed after its fault was queued must read zeros.
        for ev in uffd.read_events():
            match ev:
                case PageFault():
                    counts["faults"] += 1
                    faults.append(ev)
                case Remove(start=start, end=end):
                    counts["removes"] += 1
                    policy.removed(start, end)
                case Unmap():
                    counts["unmaps"] += 1
                case _:
                    pass
        deferred = _serve_batch(uffd, policy, faults, counts)


def _handler_main(uffd: Userfaultfd, policy: Policy, serves: tuple[int, int], stop_fd: int,
                  conn: Connection, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    counts: Counter[str] = Counter()
    error = ""
    try:
        if not _serve_until_stopped(uffd, policy, stop_fd, counts):
            error = f"no fault and no stop request for {WAIT_S:.0f} s"
    except (PageinError, OSError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    if error:
        # The toucher may be asleep in a fault nobody will serve now. Unregistering the
        # range (the ioctl acts on the toucher's memory) wakes it: its access retries as
        # an ordinary fault, and the experiment reports this error instead of hanging.
        with contextlib.suppress(PageinError):
            uffd.unregister(*serves)
    conn.send((dict(counts), error))


class FaultHandler:
    """Serve the faults of a uffd from a forked process, with ``policy``, until stopped.

    ``serves`` is the registered range ``(start, length)``: if the handler fails, it
    unregisters it so the faulting process wakes up. ``cpu`` pins the handler to one
    CPU. :meth:`stop` returns the handler's counters, or raises
    :class:`~pagein.errors.PageinError` with the handler's error.
    """

    def __init__(self, uffd: Userfaultfd, policy: Policy, serves: tuple[int, int], *,
                 cpu: int | None = None) -> None:
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._conn, child = _ctx.Pipe()
        self._proc = _ctx.Process(target=_handler_main, daemon=True,
                                  args=(uffd, policy, serves, self._stop_r, child, cpu))
        self._proc.start()
        child.close()
        os.close(self._stop_r)
        self.pid: int = self._proc.pid or 0
        self._stats: HandlerStats | None = None
        self._signalled = False

    def stop(self) -> HandlerStats:
        """Ask the handler to finish and return what it counted."""
        if self._stats is None:
            self._signal_stop()
            if not self._conn.poll(WAIT_S):
                _stop(self._proc)
                raise PageinError(f"the fault handler {self.pid} did not report within "
                               f"{WAIT_S:.0f} s")
            counts, error = self._conn.recv()
            self.close()
            if error:
                raise PageinError(f"the fault handler {self.pid} failed: {error}")
            self._stats = HandlerStats(**counts)
        return self._stats

    def _signal_stop(self) -> None:
        # A byte, not just EOF: a process forked later may hold a copy of the write end.
        if self._stop_w >= 0 and not self._signalled:
            self._signalled = True
            with contextlib.suppress(BrokenPipeError):  # the handler is gone already
                os.write(self._stop_w, b"x")

    def close(self) -> None:
        if self._stop_w >= 0:
            self._signal_stop()
            os.close(self._stop_w)
            self._stop_w = -1
        _stop(self._proc)
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
