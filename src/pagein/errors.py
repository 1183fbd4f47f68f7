"""The exceptions pagein raises.

One root, a small tree beneath it::

    PageinError
    ├── KernelError(op, errno)            a syscall or ioctl failed unexpectedly
    │   ├── UffdError(op, start, length)  a userfaultfd ioctl on a range failed
    │   ├── MappingError(op, start, length)
    │   └── KvmError(ioctl)               a KVM ioctl failed
    ├── Unavailable                       the machine lacks what is needed
    │   └── UnsupportedFeature(missing)   the kernel lacks a uffd feature / ioctl
    ├── HandshakeError(field, value)      a peer sent a bad Firecracker handshake
    ├── ConfigError                       a setting cannot work as given (exit status 2)
    ├── SnapshotFormatError               a snapshot file is malformed or truncated
    │   └── IntegrityError                content does not match its checksum
    ├── SourceError                       a page source (store) failed
    ├── GuestError                        the guest crashed or did something unservable
    └── HandlerError                      a page-fault handler failed, died or is absent
        └── UntrustedHandler(path, uid)   the handler socket is served by an untrusted uid

Expected kernel outcomes (EEXIST on a fill, EAGAIN while events are pending) are not
exceptions: they are the results in :mod:`pagein.sys.uffd`.

Every message is one sentence with the context a user needs to act on it.
"""

from __future__ import annotations

import errno as _errno
import os


class PageinError(Exception):
    """Root of every error pagein raises on purpose."""


class KernelError(PageinError):
    """A system call failed in a way the caller did not expect."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


class UffdError(KernelError):
    """A userfaultfd ioctl on ``[start, start+length)`` failed."""

    def __init__(self, op: str, err: int, start: int, length: int, detail: str = "") -> None:
        self.start = start
        self.length = length
        rng = f"range 0x{start:x}-0x{start + length:x} ({length} bytes)" if length else ""
        super().__init__(op, err, "; ".join(x for x in (rng, detail) if x))


class MappingError(KernelError):
    """mmap/munmap/madvise/mremap on a range failed."""

    def __init__(self, op: str, err: int, start: int, length: int, detail: str = "") -> None:
        self.start = start
        self.length = length
        rng = f"range 0x{start:x}-0x{start + length:x} ({length} bytes)"
        super().__init__(op, err, f"{rng}{'; ' + detail if detail else ''}")


class KvmError(KernelError):
    """A KVM ioctl failed."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        super().__init__(ioctl, err, detail)


class Unavailable(PageinError):
    """This machine lacks a device, permission or kernel feature pagein needs."""


class UnsupportedFeature(Unavailable):
    """The kernel's userfaultfd lacks a feature or ioctl the caller asked for."""

    def __init__(self, missing: list[str], detail: str) -> None:
        self.missing = missing
        super().__init__(f"userfaultfd lacks {', '.join(missing)}: {detail}")


class ConfigError(PageinError):
    """A flag or setting cannot work as given: found at start, before anything is served.

    The message names the flag and says what to change; the CLI prints it on one line
    and exits with status 2, as argparse does for a malformed flag.
    """


class HandshakeError(PageinError):
    """A VMM's handshake on the handler socket is malformed."""

    #: How much of a value the message shows: a peer controls it, and one line of a
    #: log must not carry a 4 MiB string.
    MAX_SHOWN = 80

    #: Set by the receiver: whether the peer sent a userfaultfd (only such a peer is a
    #: VMM whose guest waits on us, and only such a peer the kill policy applies to), and
    #: how many bytes it sent (0 with no fd: a health probe or a "socket in use?" check).
    sent_uffd: bool = False
    received_bytes: int = 0

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"bad handshake field {field}={shown(value, self.MAX_SHOWN)}: "
                         f"{reason}")


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` marks the cut).

    For values a peer controls: the repr escapes control characters and newlines, and
    the cut bounds the line. A huge int is described, never converted to decimal (that
    is quadratic, and refused past 4300 digits).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[:max(0, limit - 3)] + "..."


class SnapshotFormatError(PageinError):
    """A snapshot file is malformed, truncated or of an unknown version."""


class IntegrityError(SnapshotFormatError):
    """Snapshot content does not match its recorded checksum."""


class SourceError(PageinError):
    """A page source could not deliver the bytes asked for."""


class GuestError(PageinError):
    """The guest failed: an exception, a triple fault, or an unservable request."""


class HandlerError(PageinError):
    """A page-fault handler process failed or died while memory depended on it."""


class UntrustedHandler(HandlerError):
    """The process listening on a handler socket runs as a uid the VMM does not trust.

    Whoever receives a VMM's uffd can read and write its guest's memory, so the uffd is
    only sent to root, the VMM's own uid, or a uid the caller named.
    """

    def __init__(self, path: str, uid: int, pid: int) -> None:
        self.path = path
        self.uid = uid
        super().__init__(
            f"the UFFD handler on {path} (pid {pid}) runs as uid {uid}, which is not "
            f"trusted with this VM's memory; the uffd was not sent: if that handler is "
            f"yours, pass --trust-uid {uid} (trust_uids=({uid},) from Python)")
