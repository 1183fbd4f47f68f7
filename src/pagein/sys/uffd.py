"""userfaultfd: create, negotiate, register ranges, fill pages, read events.

Wraps ``userfaultfd(2)`` and ``ioctl_userfaultfd(2)``. One :class:`Userfaultfd` owns one
uffd. Expected kernel outcomes of a fill are results, not exceptions
(:data:`FillResult`): :class:`Filled`, :class:`AlreadyPresent` (EEXIST) and
:class:`Retry` (EAGAIN). Every other failure raises :class:`~pagein.errors.UffdError`.

Safety: every fill writes into the address space of the process that *created* the
uffd (even when the ioctl is issued by another process holding the fd). Callers pass
raw addresses; a wrong ``dst`` fills the wrong memory of that process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
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
from pagein.errors import Unavailable, UffdError, UnsupportedFeature
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
    "supported_api",
]


# --- results -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filled:
    """The whole range was filled (``n`` bytes)."""

    n: int


@dataclass(frozen=True, slots=True)
class AlreadyPresent:
    """EEXIST: a racing fill installed (part of) the range first.

    The waiters on that page may still be asleep: wake the range (the fill ioctl
    wakes only on success), then consider it done.
    """

    done: int = 0


@dataclass(frozen=True, slots=True)
class Retry:
    """EAGAIN: ``done`` bytes were filled; retry the rest after reading pending events.

    While a REMOVE/UNMAP/REMAP event is unread, every fill fails with EAGAIN (the
    kernel's ``mmap_changing``), so the caller must drain events before retrying.
    """

    done: int


FillResult = Filled | AlreadyPresent | Retry


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread faulted at ``address`` (page-aligned unless EXACT_ADDRESS was asked)."""

    address: int
    write: bool
    wp: bool
    minor: bool
    thread_id: int  # 0 unless Feature.THREAD_ID was negotiated


@dataclass(frozen=True, slots=True)
class Fork:
    """The monitored process forked; ``uffd`` is the child's new uffd, now owned by you."""

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


@dataclass(frozen=True, slots=True)
class ApiInfo:
    """What ``UFFDIO_API`` granted: the features and the fd-level ioctls."""

    features: Feature
    ioctls: frozenset[IoctlNr]


def _ioctl_set(mask: int) -> frozenset[IoctlNr]:
    return frozenset(nr for nr in IoctlNr if mask & (1 << nr))


_SUPPORTED: dict[bool, ApiInfo] = {}

_HELP_PERMISSION = (
    "run as root, or give this user read/write access to /dev/userfaultfd, or set "
    "sysctl vm.unprivileged_userfaultfd=1 (or grant CAP_SYS_PTRACE)"
)


def _open_raw(flags: int, user_mode_only: bool) -> int:
    """Create a uffd through /dev/userfaultfd, falling back to the syscall."""
    mode = flags | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
    dev_error: OSError | None = None
    try:
        dev = os.open(abi.USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        dev_error = e
    else:
        try:
            res = libc.ioctl_ptr(dev, abi.USERFAULTFD_IOC_NEW, mode)
            err = ctypes.get_errno()
        finally:
            os.close(dev)
        if res >= 0:
            return int(res)
        dev_error = OSError(err, os.strerror(err))
    fd = libc.syscall(ctypes.c_long(abi.NR_USERFAULTFD_X86_64), ctypes.c_int(mode))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise Unavailable(
            "userfaultfd is not available: this kernel was built without "
            "CONFIG_USERFAULTFD (Linux >= 4.3 with it enabled is needed)"
        )
    if err in (errno.EPERM, errno.EACCES):
        why = f"/dev/userfaultfd: {dev_error.strerror}; " if dev_error else ""
        raise Unavailable(f"userfaultfd creation was refused ({why}syscall: EPERM): {_HELP_PERMISSION}")
    raise UffdError("userfaultfd", err, 0, 0)


def _api(fd: int, features: int) -> ApiInfo:
    arg = abi.uffdio_api(api=abi.UFFD_API, features=features, ioctls=0)
    if libc.ioctl_ptr(fd, abi.UFFDIO_API, ctypes.addressof(arg)) < 0:
        err = ctypes.get_errno()
        raise UnsupportedFeature(
            [f.name or str(f) for f in Feature(features)] or ["UFFD_API"],
            f"UFFDIO_API refused the request ({os.strerror(err)})",
        )
    return ApiInfo(Feature(arg.features), _ioctl_set(arg.ioctls))


def supported_api(user_mode_only: bool = False) -> ApiInfo:
    """Return every feature and ioctl this kernel offers (probed once per process)."""
    if user_mode_only not in _SUPPORTED:
        fd = _open_raw(os.O_CLOEXEC, user_mode_only)
        try:
            _SUPPORTED[user_mode_only] = _api(fd, 0)
        finally:
            os.close(fd)
    return _SUPPORTED[user_mode_only]


def _kernel_hint(missing: Feature) -> str:
    since = {
        Feature.MINOR_SHMEM: "5.14",
        Feature.MINOR_HUGETLBFS: "5.13",
        Feature.WP_HUGETLBFS_SHMEM: "6.1",
        Feature.WP_UNPOPULATED: "6.4",
        Feature.POISON: "6.6",
        Feature.WP_ASYNC: "6.7",
        Feature.MOVE: "6.8",
        Feature.EXACT_ADDRESS: "5.18",
    }
    versions = [since[f] for f in Feature if f in missing and f in since]
    if versions:
        return f"upgrade to Linux >= {max(versions, key=lambda v: tuple(map(int, v.split('.'))))}"
    return "this kernel does not offer it"


class Userfaultfd(OwnedFd):
    """One userfaultfd with its negotiated API.

    Create with :meth:`open`. Usable with ``selectors``/epoll and asyncio through
    :meth:`fileno`; :meth:`read_events` reads many messages per ``read()``.
    """

    def __init__(self, fd: int, api: ApiInfo, *, nonblocking: bool) -> None:
        super().__init__(fd)
        self.api = api
        self.nonblocking = nonblocking
        # Preallocated argument structs for the hot path (one fault, one copy).
        self._copy = abi.uffdio_copy()
        self._copy_addr = ctypes.addressof(self._copy)
        self._range = abi.uffdio_range()
        self._range_addr = ctypes.addressof(self._range)

    @classmethod
    def open(
        cls,
        features: Feature = Feature(0),
        *,
        optional: Feature = Feature(0),
        nonblocking: bool = True,
        user_mode_only: bool = False,
    ) -> Userfaultfd:
        """Create a uffd and negotiate ``features`` (required) plus ``optional``.

        Uses ``/dev/userfaultfd`` (``USERFAULTFD_IOC_NEW``) when present, else the
        ``userfaultfd(2)`` syscall. Raises :class:`~pagein.errors.Unavailable` when
        neither is permitted, :class:`~pagein.errors.UnsupportedFeature` naming each
        missing required feature.
        """
        offered = supported_api(user_mode_only).features
        missing = Feature(features & ~offered)
        if missing:
            raise UnsupportedFeature(
                [f.name or str(f) for f in Feature if f in missing], _kernel_hint(missing)
            )
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = _open_raw(flags, user_mode_only)
        try:
            # The kernel answers with every feature it offers, not the ones enabled:
            # what is enabled is exactly what was asked for.
            asked = Feature(features | (optional & offered))
            api = ApiInfo(asked, _api(fd, int(asked)).ioctls)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, api, nonblocking=nonblocking)

    @classmethod
    def adopt(cls, fd: int, *, features: Feature = Feature(0)) -> Userfaultfd:
        """Take ownership of a uffd received from another process (its API is already set)."""
        ioctls = frozenset({IoctlNr.REGISTER, IoctlNr.UNREGISTER, IoctlNr.API})
        return cls(fd, ApiInfo(features, ioctls), nonblocking=not os.get_blocking(fd))

    # --- ranges --------------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> frozenset[IoctlNr]:
        """Register ``[start, start+length)`` and return the ioctls the range supports."""
        arg = abi.uffdio_register(range=abi.uffdio_range(start, length), mode=int(mode))
        self._check(libc.ioctl_ptr(self.fileno(), abi.UFFDIO_REGISTER, ctypes.addressof(arg)),
                    f"UFFDIO_REGISTER({mode!r})", start, length)
        return _ioctl_set(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range; later faults there are served by the kernel as usual."""
        self._range_op(abi.UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER", start, length)

    def wake(self, start: int, length: int) -> None:
        """Wake the threads waiting on faults in the range."""
        self._range_op(abi.UFFDIO_WAKE, "UFFDIO_WAKE", start, length)

    def _range_op(self, req: int, op: str, start: int, length: int) -> None:
        self._range.start = start
        self._range.len = length
        self._check(libc.ioctl_ptr(self.fileno(), req, self._range_addr), op, start, length)

    def _check(self, ret: int, op: str, start: int, length: int) -> None:
        if ret < 0:
            err = ctypes.get_errno()
            raise UffdError(op, err, start, length, _hint(err))

    # --- fills ---------------------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, mode: CopyMode = CopyMode.NONE) -> FillResult:
        """Atomically copy ``length`` bytes from address ``src`` (ours) to ``dst``.

        Safety: ``src`` must point at ``length`` readable bytes of this process.
        """
        c = self._copy
        c.dst = dst
        c.src = src
        c.len = length
        c.mode = mode
        ret = libc.ioctl_ptr(self.fileno(), abi.UFFDIO_COPY, self._copy_addr)
        return _fill_result("UFFDIO_COPY", ret, c.copy, dst, length)

    def zeropage(self, start: int, length: int, mode: ZeropageMode = ZeropageMode.NONE) -> FillResult:
        """Map the zero page over the range (anonymous memory only; not hugetlbfs)."""
        arg = abi.uffdio_zeropage(range=abi.uffdio_range(start, length), mode=int(mode))
        ret = libc.ioctl_ptr(self.fileno(), abi.UFFDIO_ZEROPAGE, ctypes.addressof(arg))
        return _fill_result("UFFDIO_ZEROPAGE", ret, arg.zeropage, start, length)

    def continue_(self, start: int, length: int, mode: ContinueMode = ContinueMode.NONE) -> FillResult:
        """Map pages already in the page cache (MINOR faults on shmem/hugetlbfs)."""
        arg = abi.uffdio_continue(range=abi.uffdio_range(start, length), mode=int(mode))
        ret = libc.ioctl_ptr(self.fileno(), abi.UFFDIO_CONTINUE, ctypes.addressof(arg))
        return _fill_result("UFFDIO_CONTINUE", ret, arg.mapped, start, length)

    def poison(self, start: int, length: int, mode: PoisonMode = PoisonMode.NONE) -> FillResult:
        """Install poison markers: later accesses get SIGBUS (Linux >= 6.6)."""
        arg = abi.uffdio_poison(range=abi.uffdio_range(start, length), mode=int(mode))
        ret = libc.ioctl_ptr(self.fileno(), abi.UFFDIO_POISON, ctypes.addressof(arg))
        return _fill_result("UFFDIO_POISON", ret, arg.updated, start, length)

    def move(self, dst: int, src: int, length: int, mode: MoveMode = MoveMode.NONE) -> FillResult:
        """Move pages (not copy) from ``src`` to ``dst`` in the uffd's mm (Linux >= 6.8).

        Both addresses are in the address space of the process that created the uffd.
        """
        arg = abi.uffdio_move(dst=dst, src=src, len=length, mode=int(mode))
        ret = libc.ioctl_ptr(self.fileno(), abi.UFFDIO_MOVE, ctypes.addressof(arg))
        return _fill_result("UFFDIO_MOVE", ret, arg.move, dst, length)

    def writeprotect(self, start: int, length: int,
                     mode: WriteprotectMode = WriteprotectMode.WP) -> None:
        """Set (mode WP) or clear (mode NONE) write protection on a WP-registered range.

        Clearing wakes the threads blocked on WP faults unless DONTWAKE is given.
        """
        arg = abi.uffdio_writeprotect(range=abi.uffdio_range(start, length), mode=int(mode))
        self._check(libc.ioctl_ptr(self.fileno(), abi.UFFDIO_WRITEPROTECT, ctypes.addressof(arg)),
                    "UFFDIO_WRITEPROTECT", start, length)

    # --- events --------------------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` messages with one ``read()`` and decode them.

        Returns ``[]`` when the uffd is non-blocking and nothing is pending.
        """
        try:
            data = os.read(self.fileno(), abi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        return decode_events(data)


def decode_events(data: bytes) -> list[Event]:
    """Decode a buffer of whole ``uffd_msg`` records (as ``read()`` returns them)."""
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
            out.append(Fork(Userfaultfd.adopt(a & 0xFFFFFFFF)))
        else:
            raise ValueError(f"unknown uffd event type 0x{kind:x}")
    return out


def _fill_result(op: str, ret: int, progress: int, start: int, length: int) -> FillResult:
    """Turn a fill ioctl's return value and progress field into a result.

    The kernel reports progress in the struct: bytes done, or ``-errno``.
    """
    if ret >= 0:
        return Filled(length if progress < 0 else progress)
    err = ctypes.get_errno()
    done = progress if progress > 0 else 0
    if err == errno.EEXIST:
        return AlreadyPresent(done)
    if err == errno.EAGAIN:
        return Retry(done)
    raise UffdError(op, err, start, length, _hint(err))


def _hint(err: int) -> str:
    return {
        errno.EINVAL: "check that start and length are page aligned (huge-page aligned on "
                      "hugetlbfs) and the range is registered in the right mode",
        errno.ENOENT: "the range is not registered (or no longer mapped) in the faulting process",
        errno.ESRCH: "the process that owns this memory has exited",
        errno.EBADF: "the uffd is closed",
        errno.ENOMEM: "the kernel could not allocate the page",
        errno.EPERM: "the range's mapping does not allow this operation",
    }.get(err, "")
