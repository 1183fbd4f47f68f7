"""userfaultfd: create, negotiate, register ranges, fill pages, read events.

Wraps ``userfaultfd(2)`` and ``ioctl_userfaultfd(2)``. One :class:`Userfaultfd` owns one
uffd. Expected kernel outcomes of a fill are results, not exceptions
(:data:`FillResult`): :class:`Filled`, :class:`AlreadyPresent` (EEXIST) and
:class:`Retry` (EAGAIN). Every other failure raises :class:`~pagein.errors.UffdError`.

Blocking and non-blocking use: a uffd opened with ``nonblocking=True`` (the default)
works with ``selectors``/epoll and asyncio (:meth:`Userfaultfd.read_events_async`);
the kernel reports ``EPOLLERR`` to ``poll`` on a *blocking* uffd, so a blocking uffd
can only be read directly (:meth:`Userfaultfd.read_events` then sleeps in ``read``
with the GIL released). ``read`` never returns end-of-file: watch the peer's socket
or a pidfd to learn that the monitored process is gone.

Safety: every fill writes into the address space of the process that *created* the
uffd (even when the ioctl is issued by another process holding the fd). Callers pass
raw addresses; a wrong ``dst`` fills the wrong memory of that process.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import os
import struct
import threading
from dataclasses import dataclass

from pagein._abi import uffd as abi
from pagein._abi.uffd import (
    ContinueMode,
    CopyMode,
    EventType,
    Feature,
    IoctlNr,
    MoveMode,
    PagefaultFlag,
    PoisonMode,
    RegisterMode,
    WriteprotectMode,
    ZeropageMode,
)
from pagein.errors import UnsupportedFeature
from pagein.sys._fd import OwnedFd
from pagein.sys._uffd_api import (
    ApiInfo,
    Arg,
    error_for,
    feature_names,
    ioctl_set,
    kernel_hint,
    negotiate,
    open_raw,
    supported_api,
)

__all__ = [
    "AlreadyPresent",
    "ApiInfo",
    "ContinueMode",
    "CopyMode",
    "Event",
    "Feature",
    "FillResult",
    "Filled",
    "Fork",
    "IoctlNr",
    "MoveMode",
    "PageFault",
    "PoisonMode",
    "RegisterMode",
    "Remap",
    "Remove",
    "Retry",
    "Unmap",
    "Userfaultfd",
    "WriteprotectMode",
    "ZeropageMode",
    "decode_events",
    "feature_names",
    "supported_api",
]


# --- results -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filled:
    """The whole range was filled (``n`` bytes)."""

    n: int


@dataclass(frozen=True, slots=True)
class AlreadyPresent:
    """EEXIST: a racing fill (or an earlier one) installed the page first.

    The waiters on that page may still be asleep: the fill ioctl wakes only when it
    succeeds, so wake the range (:meth:`Userfaultfd.wake`), then consider it done.
    """

    done: int = 0


@dataclass(frozen=True, slots=True)
class Retry:
    """EAGAIN: ``done`` bytes were filled; retry the rest after reading pending events.

    While a REMOVE/UNMAP/REMAP/FORK event is unread, every fill fails with EAGAIN (the
    kernel's ``mmap_changing``), so the caller must drain events before retrying. A
    partial fill (``done > 0``) is reported the same way.
    """

    done: int


FillResult = Filled | AlreadyPresent | Retry


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread faulted at ``address`` (page-aligned unless EXACT_ADDRESS was asked).

    ``write``: the access was a write. ``wp``: a write hit a write-protected page (WP
    mode). ``minor``: the page is in the page cache but not mapped (MINOR mode).
    """

    address: int
    write: bool
    wp: bool
    minor: bool
    thread_id: int  # 0 unless Feature.THREAD_ID was negotiated


@dataclass(frozen=True, slots=True)
class Fork:
    """The monitored process forked; ``uffd`` is the child's new uffd, now owned by you.

    The child's registered ranges fault into ``uffd`` (it acts on the child's address
    space). Close it when done, or the child's ranges fall back to normal faults.
    """

    uffd: Userfaultfd


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap moved ``[old_start, old_start+length)`` to ``new_start``."""

    old_start: int
    new_start: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """``[start, end)`` was dropped by madvise(DONTNEED/REMOVE): it must read zeros now."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """``[start, end)`` was munmapped (or replaced by a MAP_FIXED mapping)."""

    start: int
    end: int


Event = PageFault | Fork | Remap | Remove | Unmap

_MSG = struct.Struct(abi.UFFD_MSG_FORMAT)


# Word positions of the fill argument structs' fields (all fields are 64-bit).
_W = abi.word
# dst/src/len/mode/result: the layout of uffdio_copy and uffdio_move.
_DST, _SRC, _LEN, _MODE, _DONE = (_W(abi.uffdio_copy, f) for f in ("dst", "src", "len",
                                                                   "mode", "copy"))
# range.start/range.len/mode/result: zeropage, continue, poison, register, writeprotect.
_R_START = _W(abi.uffdio_zeropage, "range")
_R_LEN = _R_START + 1
_R_MODE = _W(abi.uffdio_zeropage, "mode")
_R_DONE = _W(abi.uffdio_zeropage, "zeropage")
_REG_IOCTLS = _W(abi.uffdio_register, "ioctls")
_ioctl = fcntl.ioctl
_get_ident = threading.get_ident

# Filled results are immutable: share one per length instead of allocating per fault.
_FILLED: dict[int, Filled] = {}


def _filled(n: int) -> Filled:
    f = _FILLED.get(n)
    if f is None:
        f = Filled(n)
        if len(_FILLED) < 256:
            _FILLED[n] = f
    return f


class Userfaultfd(OwnedFd):
    """One userfaultfd with its negotiated API.

    Create with :meth:`open`. Usable with ``selectors``/epoll and asyncio through
    :meth:`fileno`; :meth:`read_events` reads many messages per ``read()``. After
    :meth:`close`, every method raises ``ValueError`` (from :meth:`fileno`).

    Fills may be issued from several threads at once: the creating thread reuses
    preallocated argument buffers (the per-fault hot path), other threads build their
    own. Every ioctl releases the GIL while the kernel works.
    """

    def __init__(self, fd: int, api: ApiInfo, *, nonblocking: bool) -> None:
        super().__init__(fd)
        self.api = api
        self.nonblocking = nonblocking
        # Preallocated argument structs for the hot path (one fault, one fill), used only
        # by the thread that created this object; other threads get fresh ones, so
        # concurrent fills from several threads never share an argument buffer.
        self._owner = _get_ident()
        self._copy_arg = Arg(abi.uffdio_copy)
        self._cont_arg = Arg(abi.uffdio_continue)
        self._range_arg = Arg(abi.uffdio_range)
        # Reads go through a FileIO over the same fd (never closing it): its readinto
        # needs no iovec list, and an empty non-blocking read returns None instead of
        # raising BlockingIOError (an exception costs microseconds per empty poll).
        self._reader = io.FileIO(fd, "rb", closefd=False)

    def close(self) -> None:
        """Close the uffd (idempotent); the registered ranges fall back to normal faults
        once every process holding it has closed it."""
        self._reader.close()
        super().close()

    @classmethod
    def open(
        cls,
        features: Feature = Feature.NONE,
        *,
        optional: Feature = Feature.NONE,
        nonblocking: bool = True,
        user_mode_only: bool = False,
    ) -> Userfaultfd:
        """Create a uffd and negotiate ``features`` (required) plus ``optional``.

        Uses ``/dev/userfaultfd`` (``USERFAULTFD_IOC_NEW``) when present, else the
        ``userfaultfd(2)`` syscall. Raises :class:`~pagein.errors.Unavailable` when
        neither is permitted (naming the device, the sysctl and the capability),
        :class:`~pagein.errors.UnsupportedFeature` naming each missing required feature
        and the kernel version that has it.
        """
        offered = supported_api(user_mode_only).features
        missing = int(features) & ~int(offered)
        if missing:
            raise UnsupportedFeature(feature_names(missing), kernel_hint(missing))
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = open_raw(flags, user_mode_only)
        try:
            asked = Feature(features | (optional & offered))
            # WP_ASYNC implies WP_UNPOPULATED: the kernel turns it on by itself.
            if asked & Feature.WP_ASYNC:
                asked |= Feature.WP_UNPOPULATED
            api = ApiInfo(asked, negotiate(fd, int(asked)).ioctls)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, api, nonblocking=nonblocking)

    @classmethod
    def adopt(cls, fd: int, *, features: Feature = Feature.NONE) -> Userfaultfd:
        """Own a uffd received from another process or a fork event (API already set).

        ``features`` records what the creator negotiated, when known.
        """
        ioctls = frozenset({IoctlNr.REGISTER, IoctlNr.UNREGISTER, IoctlNr.API})
        return cls(fd, ApiInfo(features, ioctls), nonblocking=not os.get_blocking(fd))

    def set_nonblocking(self, nonblocking: bool) -> None:
        """Switch ``O_NONBLOCK`` (shared with every process holding this open file).

        A blocking uffd reports ``EPOLLERR`` to poll/epoll: only read it directly.
        """
        os.set_blocking(self.fileno(), not nonblocking)
        self.nonblocking = nonblocking

    # --- ranges --------------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> frozenset[IoctlNr]:
        """Register ``[start, start+length)`` and return the ioctls the range supports.

        Wraps ``UFFDIO_REGISTER``. Raises :class:`~pagein.errors.UffdError` (EINVAL for a
        misaligned range or a mode this memory does not support, ENOMEM for a hole,
        EBUSY when another uffd has it).
        """
        arg = self._ranged(abi.uffdio_register, start, length, mode)
        try:
            _ioctl(self.fileno(), abi.UFFDIO_REGISTER, arg.buf, True)
        except OSError as e:
            raise error_for("UFFDIO_REGISTER", e.errno or 0, start, length) from None
        return ioctl_set(arg.u[_REG_IOCTLS])

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range; later faults there are served by the kernel as usual."""
        self._range_op(abi.UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", start, length)

    def wake(self, start: int, length: int) -> None:
        """Wake the threads waiting on faults in the range (``UFFDIO_WAKE``)."""
        self._range_op(abi.UFFDIO_WAKE, "UFFDIO_WAKE", start, length)

    def _range_op(self, req: int, op: str, start: int, length: int) -> None:
        arg = self._range_arg if _get_ident() == self._owner else Arg(abi.uffdio_range)
        u = arg.u
        u[_R_START] = start
        u[_R_LEN] = length
        try:
            _ioctl(self.fileno(), req, arg.buf, True)
        except OSError as e:
            raise error_for(op, self._errno(e), start, length) from None

    def _ranged(self, struct_type: abi.StructType, start: int, length: int,
                mode: int) -> Arg:
        """A fresh range/mode argument (register, zeropage, poison, writeprotect)."""
        arg = Arg(struct_type)
        arg.u[_R_START], arg.u[_R_LEN], arg.u[_R_MODE] = start, length, mode
        return arg

    def _errno(self, e: OSError) -> int:
        """The errno of a failed ioctl; a closed uffd raises ValueError like fileno()."""
        if self._fd < 0:
            self.fileno()
        return e.errno or 0

    def _fill(self, req: int, op: str, arg: Arg, done_word: int, start: int,
              length: int) -> FillResult:
        """Issue a fill ioctl and turn its outcome into a result (see _fill_failed)."""
        arg.u[done_word] = 0
        try:
            _ioctl(self.fileno(), req, arg.buf, True)
        except OSError as e:
            return _fill_failed(op, self._errno(e), arg.s[done_word], start, length)
        done = arg.s[done_word]
        return _filled(done if done > 0 else length)

    # --- fills ---------------------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, mode: CopyMode = CopyMode.NONE) -> FillResult:
        """Atomically copy ``length`` bytes from address ``src`` (ours) to ``dst``.

        Wraps ``UFFDIO_COPY``; wakes the faulting threads unless ``CopyMode.DONTWAKE``;
        ``CopyMode.WP`` maps the pages write-protected (range registered with WP).

        Safety: ``src`` must point at ``length`` readable bytes of this process; ``dst``
        is an address in the uffd creator's address space.
        """
        # The hot path: one preallocated argument, one ioctl, a shared result.
        arg = self._copy_arg if _get_ident() == self._owner else Arg(abi.uffdio_copy)
        u = arg.u
        u[_DST] = dst
        u[_SRC] = src
        u[_LEN] = length
        u[_MODE] = mode
        # Some EAGAIN/EINVAL paths return before the kernel writes ``copy``: a stale
        # value from the previous call must not be read as progress.
        u[_DONE] = 0
        try:
            _ioctl(self._fd, abi.UFFDIO_COPY, arg.buf, True)
        except ValueError:  # fd -1: closed
            self.fileno()
            raise
        except OSError as e:
            return _fill_failed("UFFDIO_COPY", self._errno(e), arg.s[_DONE], dst, length)
        return _FILLED.get(length) or _filled(length)

    def zeropage(self, start: int, length: int,
                 mode: ZeropageMode = ZeropageMode.NONE) -> FillResult:
        """Map the zero page over the range (``UFFDIO_ZEROPAGE``; not on hugetlbfs)."""
        arg = self._ranged(abi.uffdio_zeropage, start, length, mode)
        return self._fill(abi.UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", arg, _R_DONE, start, length)

    def continue_(self, start: int, length: int,
                  mode: ContinueMode = ContinueMode.NONE) -> FillResult:
        """Map pages already in the page cache (``UFFDIO_CONTINUE``, MINOR faults)."""
        arg = self._cont_arg if _get_ident() == self._owner else Arg(abi.uffdio_continue)
        u = arg.u
        u[_R_START] = start
        u[_R_LEN] = length
        u[_R_MODE] = mode
        return self._fill(abi.UFFDIO_CONTINUE, "UFFDIO_CONTINUE", arg, _R_DONE, start, length)

    def poison(self, start: int, length: int, mode: PoisonMode = PoisonMode.NONE) -> FillResult:
        """Install poison markers: later accesses get SIGBUS (``UFFDIO_POISON``, 6.6+)."""
        arg = self._ranged(abi.uffdio_poison, start, length, mode)
        return self._fill(abi.UFFDIO_POISON, "UFFDIO_POISON", arg, _R_DONE, start, length)

    def move(self, dst: int, src: int, length: int, mode: MoveMode = MoveMode.NONE) -> FillResult:
        """Move pages (not copy) from ``src`` to ``dst`` (``UFFDIO_MOVE``, Linux >= 6.8).

        Both addresses are in the address space of the process that created the uffd,
        and the kernel refuses cross-mm moves: only a thread of that process may call
        this (EINVAL otherwise). ``src`` reads as unpopulated afterwards.
        """
        arg = Arg(abi.uffdio_move)
        arg.u[_DST], arg.u[_SRC], arg.u[_LEN], arg.u[_MODE] = dst, src, length, mode
        return self._fill(abi.UFFDIO_MOVE, "UFFDIO_MOVE", arg, _DONE, dst, length)

    def writeprotect(self, start: int, length: int,
                     mode: WriteprotectMode = WriteprotectMode.WP) -> None:
        """Set (mode WP) or clear (mode NONE) write protection on a WP-registered range.

        Clearing wakes the threads blocked on WP faults unless DONTWAKE is given.
        """
        arg = self._ranged(abi.uffdio_writeprotect, start, length, mode)
        try:
            _ioctl(self.fileno(), abi.UFFDIO_WRITEPROTECT, arg.buf, True)
        except OSError as e:
            raise error_for("UFFDIO_WRITEPROTECT", self._errno(e), start, length) from None

    # --- events --------------------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` messages with one ``read()`` and decode them.

        Returns ``[]`` when the uffd is non-blocking and nothing is pending; a blocking
        uffd sleeps (GIL released) until at least one message arrives. A :class:`Fork`
        hands you the child's new uffd.
        """
        self.fileno()  # ValueError once closed: the fd number may belong to a new file
        data = self._reader.read(abi.UFFD_MSG_SIZE * max_events)
        if not data:  # None: non-blocking and nothing pending
            return []
        return decode_events(data, features=self.api.features)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Read raw ``uffd_msg`` records into ``buf`` and return how many arrived.

        The allocation-free path for tight loops (decode with ``_abi.uffd.UFFD_MSG_FORMAT``);
        returns 0 when non-blocking and nothing is pending. Fork messages read this way
        carry a new fd the caller must adopt or close.
        """
        if self._fd < 0:
            self.fileno()
        n = self._reader.readinto(buf)
        return 0 if n is None else n // abi.UFFD_MSG_SIZE

    async def read_events_async(self, max_events: int = 64) -> list[Event]:
        """Wait (asyncio) until messages are pending, then read and decode them.

        Needs a non-blocking uffd; uses ``loop.add_reader`` on the fd.
        """
        if not self.nonblocking:
            raise ValueError("read_events_async needs a uffd opened with nonblocking=True")
        while True:
            events = self.read_events(max_events)
            if events:
                return events
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.fileno()
            loop.add_reader(fd, _set_ready, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def decode_events(data: bytes | bytearray | memoryview, *,
                  features: Feature = Feature.NONE) -> list[Event]:
    """Decode a buffer of whole ``uffd_msg`` records (as ``read()`` returns them).

    A fork message's fd is adopted as a :class:`Userfaultfd` with ``features`` (a forked
    uffd inherits its parent's). Raises ``ValueError`` on a torn record or an unknown
    event type (after closing any fork fds already decoded).
    """
    if len(data) % abi.UFFD_MSG_SIZE:
        raise ValueError(f"uffd read returned {len(data)} bytes, not a multiple of 32")
    out: list[Event] = []
    for kind, a, b, c in _MSG.iter_unpack(data):
        if kind == EventType.PAGEFAULT:
            out.append(PageFault(b, bool(a & PagefaultFlag.WRITE), bool(a & PagefaultFlag.WP),
                                 bool(a & PagefaultFlag.MINOR), c & 0xFFFFFFFF))
        elif kind == EventType.REMOVE:
            out.append(Remove(a, b))
        elif kind == EventType.UNMAP:
            out.append(Unmap(a, b))
        elif kind == EventType.REMAP:
            out.append(Remap(a, b, c))
        elif kind == EventType.FORK:
            out.append(Fork(Userfaultfd.adopt(a & 0xFFFFFFFF, features=features)))
        else:
            for ev in out:
                if isinstance(ev, Fork):
                    ev.uffd.close()
            raise ValueError(f"unknown uffd event type 0x{kind:x}")
    return out


def _fill_failed(op: str, err: int, progress: int, start: int, length: int) -> FillResult:
    """Turn a failed fill ioctl's errno and progress field into a result or an error.

    The kernel reports progress in the struct's last field: bytes done, or ``-errno``.
    A partial fill fails with EAGAIN and the bytes done; EEXIST means the first page
    was already there; EAGAIN with no progress means an event is pending.
    """
    done = progress if progress > 0 else 0
    if err == errno.EEXIST:
        return AlreadyPresent(done)
    if err == errno.EAGAIN:
        return Retry(done)
    raise error_for(op, err, start, length)
