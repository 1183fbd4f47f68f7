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
import os
import struct
import threading
from dataclasses import dataclass

from pagein._abi import libc
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
from pagein.errors import UffdError, Unavailable, UnsupportedFeature
from pagein.sys._fd import OwnedFd

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


# --- ioctl arguments -------------------------------------------------------------------
#
# Ioctls go through ``fcntl.ioctl`` with a bytearray argument: it copies the struct in
# and out around the call with the GIL released, and costs far less per call than a
# ctypes foreign call (this is the per-fault hot path). Field positions come from the
# ctypes structs in ``_abi`` (every field is 64-bit).


class _Arg:
    """One ioctl argument struct: its bytes, viewed as unsigned and signed u64 words."""

    __slots__ = ("buf", "s", "u")

    def __init__(self, struct_type: abi.StructType) -> None:
        self.buf = bytearray(abi.size(struct_type))
        view = memoryview(self.buf)
        self.u = view.cast("Q")
        self.s = view.cast("q")


_W = abi.word
_API_API, _API_FEATURES, _API_IOCTLS = (_W(abi.uffdio_api, f) for f in ("api", "features",
                                                                       "ioctls"))
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


@dataclass(frozen=True, slots=True)
class ApiInfo:
    """What ``UFFDIO_API`` granted: the features enabled and the fd-level ioctls."""

    features: Feature
    ioctls: frozenset[IoctlNr]


def _ioctl_set(mask: int) -> frozenset[IoctlNr]:
    return frozenset(nr for nr in IoctlNr if mask & (1 << nr))


def feature_names(features: int) -> list[str]:
    """Return the kernel names (``UFFD_FEATURE_*``) of the bits set in ``features``."""
    names = [f"UFFD_FEATURE_{f.name}" for f in Feature if features & f]
    known = sum(Feature)
    names += [f"unknown feature bit {b}" for b in range(64)
              if features & (1 << b) and not known & (1 << b)]
    return names


# The first Linux release that offers each feature (x86-64), for error messages.
_FEATURE_SINCE: dict[Feature, str] = {
    Feature.PAGEFAULT_FLAG_WP: "5.7",
    Feature.EVENT_FORK: "4.11",
    Feature.EVENT_REMAP: "4.11",
    Feature.EVENT_REMOVE: "4.11",
    Feature.MISSING_HUGETLBFS: "4.11",
    Feature.MISSING_SHMEM: "4.11",
    Feature.EVENT_UNMAP: "4.11",
    Feature.SIGBUS: "4.14",
    Feature.THREAD_ID: "4.14",
    Feature.MINOR_HUGETLBFS: "5.13",
    Feature.MINOR_SHMEM: "5.14",
    Feature.EXACT_ADDRESS: "5.18",
    Feature.WP_HUGETLBFS_SHMEM: "5.19",
    Feature.WP_UNPOPULATED: "6.4",
    Feature.POISON: "6.6",
    Feature.WP_ASYNC: "6.7",
    Feature.MOVE: "6.8",
}


def _kernel_hint(missing: int) -> str:
    versions = [_FEATURE_SINCE[f] for f in Feature if missing & f and f in _FEATURE_SINCE]
    running = os.uname().release
    if not versions:
        return f"this kernel ({running}) does not know it"
    need = max(versions, key=lambda v: tuple(map(int, v.split("."))))
    return (f"it needs Linux >= {need} built with the matching CONFIG_* options "
            f"(running {running}); upgrade the kernel or drop the feature")


_HELP_PERMISSION = (
    "run as root, give this user read/write access to /dev/userfaultfd, set sysctl "
    "vm.unprivileged_userfaultfd=1, grant CAP_SYS_PTRACE, or open with "
    "user_mode_only=True"
)


def _open_raw(flags: int, user_mode_only: bool) -> int:
    """Create a uffd through /dev/userfaultfd, falling back to the syscall."""
    mode = flags | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
    dev_error = ""
    try:
        dev = os.open(abi.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        dev_error = f"{abi.USERFAULTFD_DEVICE}: {e.strerror}"
    else:
        try:
            return fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, mode)
        except OSError as e:
            dev_error = f"USERFAULTFD_IOC_NEW: {e.strerror}"
        finally:
            os.close(dev)
    fd = libc.syscall1(abi.NR_USERFAULTFD_X86_64, mode)
    if fd >= 0:
        return fd
    err = libc.get_errno()
    if err == errno.ENOSYS:
        raise Unavailable(
            "userfaultfd is not available: this kernel was built without "
            "CONFIG_USERFAULTFD; use a Linux >= 4.3 kernel with it enabled")
    if err in (errno.EPERM, errno.EACCES):
        raise Unavailable(
            f"userfaultfd creation was refused ({dev_error}; userfaultfd(2): "
            f"{os.strerror(err)}): {_HELP_PERMISSION}")
    if err == errno.EINVAL and user_mode_only:
        raise UnsupportedFeature(
            ["UFFD_USER_MODE_ONLY"], "it needs Linux >= 5.11; open without user_mode_only")
    raise Unavailable(f"userfaultfd(2) failed: {os.strerror(err)} ({dev_error})")


def _api(fd: int, features: int) -> ApiInfo:
    arg = _Arg(abi.uffdio_api)
    arg.u[_API_API], arg.u[_API_FEATURES] = abi.UFFD_API, features
    try:
        fcntl.ioctl(fd, abi.UFFDIO_API, arg.buf, True)
    except OSError as e:
        err = e.errno or 0
        if err == errno.EPERM and features & Feature.EVENT_FORK:
            raise UnsupportedFeature(
                ["UFFD_FEATURE_EVENT_FORK"],
                "UFFDIO_API refused it (EPERM): it needs CAP_SYS_PTRACE; run as root or "
                "drop Feature.EVENT_FORK") from None
        raise UnsupportedFeature(
            feature_names(features) or ["UFFD_API"],
            f"UFFDIO_API refused the request ({os.strerror(err)}); {_kernel_hint(features)}",
        ) from None
    # The kernel writes back every feature it *offers*, not the ones it enabled.
    return ApiInfo(Feature(arg.u[_API_FEATURES]), _ioctl_set(arg.u[_API_IOCTLS]))


_SUPPORTED: dict[bool, ApiInfo] = {}


def supported_api(user_mode_only: bool = False) -> ApiInfo:
    """Return every feature and ioctl this kernel offers (probed once per process)."""
    if user_mode_only not in _SUPPORTED:
        fd = _open_raw(os.O_CLOEXEC, user_mode_only)
        try:
            _SUPPORTED[user_mode_only] = _api(fd, 0)
        finally:
            os.close(fd)
    return _SUPPORTED[user_mode_only]


# Per-errno advice appended to UffdError messages; ops can refine it (see _OP_HINTS).
_HINTS = {
    errno.EINVAL: "check that start and length are page aligned (huge-page aligned on "
                  "hugetlbfs), non-zero, and that the range is registered in the mode this "
                  "operation needs",
    errno.ENOENT: "the range is not registered with this uffd (or no longer mapped) in the "
                  "process that created it",
    errno.ESRCH: "the process that created this uffd has exited",
    errno.ENOMEM: "the kernel could not allocate the page (or no 2 MiB page is free: raise "
                  "sysctl vm.nr_hugepages)",
    errno.EPERM: "the range's mapping does not allow this operation",
    errno.EFAULT: "the source or destination address is not mapped in the right process",
}
_OP_HINTS = {
    ("UFFDIO_REGISTER", errno.EINVAL): "check that start and length are page aligned and "
        "that this kind of memory supports the mode (MINOR needs shmem or hugetlbfs)",
    ("UFFDIO_REGISTER", errno.ENOMEM): "part of the range is not mapped",
    ("UFFDIO_REGISTER", errno.EBUSY): "the range is already registered with another uffd",
    ("UFFDIO_MOVE", errno.EINVAL): "UFFDIO_MOVE must be called by the process that created "
        "the uffd, with Feature.MOVE, page-aligned private anonymous source and destination "
        "of equal protection, and a destination registered with this uffd",
    ("UFFDIO_MOVE", errno.EBUSY): "a source page is shared (e.g. after fork); copy it instead",
    ("UFFDIO_POISON", errno.EINVAL): "UFFDIO_POISON needs Feature.POISON at open and a "
        "page-aligned registered range",
    ("UFFDIO_CONTINUE", errno.EFAULT): "the page is not in the page cache: write it "
        "through another mapping of the file first",
}


def _error(op: str, err: int, start: int, length: int) -> UffdError:
    return UffdError(op, err, start, length, _OP_HINTS.get((op, err)) or _HINTS.get(err, ""))


class Userfaultfd(OwnedFd):
    """One userfaultfd with its negotiated API.

    Create with :meth:`open`. Usable with ``selectors``/epoll and asyncio through
    :meth:`fileno`; :meth:`read_events` reads many messages per ``read()``. After
    :meth:`close`, every method raises ``ValueError`` (from :meth:`fileno`).
    """

    def __init__(self, fd: int, api: ApiInfo, *, nonblocking: bool) -> None:
        super().__init__(fd)
        self.api = api
        self.nonblocking = nonblocking
        # Preallocated argument structs for the hot path (one fault, one fill), used only
        # by the thread that created this object; other threads get fresh ones, so
        # concurrent fills from several threads never share an argument buffer.
        self._owner = _get_ident()
        self._copy_arg = _Arg(abi.uffdio_copy)
        self._cont_arg = _Arg(abi.uffdio_continue)
        self._range_arg = _Arg(abi.uffdio_range)

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
            raise UnsupportedFeature(feature_names(missing), _kernel_hint(missing))
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = _open_raw(flags, user_mode_only)
        try:
            asked = Feature(features | (optional & offered))
            # WP_ASYNC implies WP_UNPOPULATED: the kernel turns it on by itself.
            if asked & Feature.WP_ASYNC:
                asked |= Feature.WP_UNPOPULATED
            api = ApiInfo(asked, _api(fd, int(asked)).ioctls)
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
            raise _error("UFFDIO_REGISTER", e.errno or 0, start, length) from None
        return _ioctl_set(arg.u[_REG_IOCTLS])

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range; later faults there are served by the kernel as usual."""
        self._range_op(abi.UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", start, length)

    def wake(self, start: int, length: int) -> None:
        """Wake the threads waiting on faults in the range (``UFFDIO_WAKE``)."""
        self._range_op(abi.UFFDIO_WAKE, "UFFDIO_WAKE", start, length)

    def _range_op(self, req: int, op: str, start: int, length: int) -> None:
        arg = self._range_arg if _get_ident() == self._owner else _Arg(abi.uffdio_range)
        u = arg.u
        u[_R_START] = start
        u[_R_LEN] = length
        try:
            _ioctl(self.fileno(), req, arg.buf, True)
        except OSError as e:
            raise _error(op, self._errno(e), start, length) from None

    def _ranged(self, struct_type: abi.StructType, start: int, length: int,
                mode: int) -> _Arg:
        """A fresh range/mode argument (register, zeropage, poison, writeprotect)."""
        arg = _Arg(struct_type)
        arg.u[_R_START], arg.u[_R_LEN], arg.u[_R_MODE] = start, length, mode
        return arg

    def _errno(self, e: OSError) -> int:
        """The errno of a failed ioctl; a closed uffd raises ValueError like fileno()."""
        if self._fd < 0:
            self.fileno()
        return e.errno or 0

    def _fill(self, req: int, op: str, arg: _Arg, done_word: int, start: int,
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
        arg = self._copy_arg if _get_ident() == self._owner else _Arg(abi.uffdio_copy)
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
        return _filled(length)

    def zeropage(self, start: int, length: int,
                 mode: ZeropageMode = ZeropageMode.NONE) -> FillResult:
        """Map the zero page over the range (``UFFDIO_ZEROPAGE``; not on hugetlbfs)."""
        arg = self._ranged(abi.uffdio_zeropage, start, length, mode)
        return self._fill(abi.UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", arg, _R_DONE, start, length)

    def continue_(self, start: int, length: int,
                  mode: ContinueMode = ContinueMode.NONE) -> FillResult:
        """Map pages already in the page cache (``UFFDIO_CONTINUE``, MINOR faults)."""
        arg = self._cont_arg if _get_ident() == self._owner else _Arg(abi.uffdio_continue)
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
        arg = _Arg(abi.uffdio_move)
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
            raise _error("UFFDIO_WRITEPROTECT", self._errno(e), start, length) from None

    # --- events --------------------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` messages with one ``read()`` and decode them.

        Returns ``[]`` when the uffd is non-blocking and nothing is pending; a blocking
        uffd sleeps (GIL released) until at least one message arrives. A :class:`Fork`
        hands you the child's new uffd.
        """
        try:
            data = os.read(self.fileno(), abi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        return decode_events(data, features=self.api.features)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Read raw ``uffd_msg`` records into ``buf`` and return how many arrived.

        The allocation-free path for tight loops (decode with ``_abi.uffd.UFFD_MSG_FORMAT``);
        returns 0 when non-blocking and nothing is pending. Fork messages read this way
        carry a new fd the caller must adopt or close.
        """
        try:
            n = os.readv(self.fileno(), [buf])
        except BlockingIOError:
            return 0
        return n // abi.UFFD_MSG_SIZE

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
    raise _error(op, err, start, length)
