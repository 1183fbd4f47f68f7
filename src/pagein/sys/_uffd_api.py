"""userfaultfd creation and ``UFFDIO_API`` negotiation, and the error messages.

Private to :mod:`pagein.sys.uffd` (split out to keep that module readable); import the
public names from there.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from pagein._abi import libc
from pagein._abi import uffd as abi
from pagein._abi.uffd import Feature, IoctlNr
from pagein.errors import UffdError, Unavailable, UnsupportedFeature

# --- ioctl arguments -------------------------------------------------------------------
#
# Ioctls go through ``fcntl.ioctl`` with a bytearray argument: it copies the struct in
# and out around the call with the GIL released, and costs far less per call than a
# ctypes foreign call (this is the per-fault hot path). Field positions come from the
# ctypes structs in ``_abi`` (every field is 64-bit).


class Arg:
    """One ioctl argument struct: its bytes, viewed as unsigned and signed u64 words."""

    __slots__ = ("buf", "s", "u")

    def __init__(self, struct_type: abi.StructType) -> None:
        self.buf = bytearray(abi.size(struct_type))
        view = memoryview(self.buf)
        self.u = view.cast("Q")
        self.s = view.cast("q")


_API_API, _API_FEATURES, _API_IOCTLS = (abi.word(abi.uffdio_api, f)
                                        for f in ("api", "features", "ioctls"))


@dataclass(frozen=True, slots=True)
class ApiInfo:
    """What ``UFFDIO_API`` granted: the features enabled and the fd-level ioctls."""

    features: Feature
    ioctls: frozenset[IoctlNr]


def ioctl_set(mask: int) -> frozenset[IoctlNr]:
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


def kernel_hint(missing: int) -> str:
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


def open_raw(flags: int, user_mode_only: bool) -> int:
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


def negotiate(fd: int, features: int) -> ApiInfo:
    arg = Arg(abi.uffdio_api)
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
            f"UFFDIO_API refused the request ({os.strerror(err)}); {kernel_hint(features)}",
        ) from None
    # The kernel writes back every feature it *offers*, not the ones it enabled.
    return ApiInfo(Feature(arg.u[_API_FEATURES]), ioctl_set(arg.u[_API_IOCTLS]))


_SUPPORTED: dict[bool, ApiInfo] = {}


def supported_api(user_mode_only: bool = False) -> ApiInfo:
    """Return every feature and ioctl this kernel offers (probed once per process)."""
    if user_mode_only not in _SUPPORTED:
        fd = open_raw(os.O_CLOEXEC, user_mode_only)
        try:
            _SUPPORTED[user_mode_only] = negotiate(fd, 0)
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
    ("UFFDIO_COPY", errno.EFAULT): "the source could not be read (a file mapped as the "
        "source was truncated under it?) or the destination is not mapped in the process "
        "that created the uffd",
    ("UFFDIO_CONTINUE", errno.EFAULT): "the page is not in the page cache: write it "
        "through another mapping of the file first",
}


def error_for(op: str, err: int, start: int, length: int) -> UffdError:
    return UffdError(op, err, start, length, _OP_HINTS.get((op, err)) or _HINTS.get(err, ""))
