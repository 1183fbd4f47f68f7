"""Pipes that hold references to user pages: ``vmsplice(2)``.

``vmsplice`` of user memory into a pipe does not copy it: the pipe takes a reference
to each physical page and copies only when the pipe is read. Whatever happens to the
*virtual* address afterwards (``munmap``, or an ``mmap(MAP_FIXED)`` replacing it), the
pipe keeps the page it was given. The lab uses this to show that an address handed to
the kernel earlier keeps the old memory after a mapping is replaced.

Safety: :func:`vmsplice` hands the kernel a raw address; the range must be mapped and
readable in this process.
"""

from __future__ import annotations

import fcntl

from pagein._abi import splice as abi
from pagein._abi.libc import get_errno
from pagein._abi.splice import SpliceFlag
from pagein.errors import KernelError

__all__ = ["SpliceFlag", "pipe_capacity", "set_pipe_capacity", "vmsplice"]


def vmsplice(fd: int, address: int, length: int, flags: SpliceFlag = SpliceFlag.NONE) -> int:
    """Splice ``[address, address+length)`` into the write end ``fd`` of a pipe.

    Returns the bytes the pipe took (it may take fewer than ``length`` when it is
    full). Raises :class:`~pagein.errors.KernelError` on failure.

    Safety: the pipe keeps references to the pages, not a copy of their bytes: later
    writes to those physical pages show up when the pipe is read.
    """
    n = abi.vmsplice_one(fd, address, length, int(flags))
    if n < 0:
        err = get_errno()
        raise KernelError(f"vmsplice(fd={fd}, 0x{address:x}, {length})", err,
                          "pass the write end of a pipe and a mapped, readable range")
    return int(n)


def pipe_capacity(fd: int) -> int:
    """Return the pipe's capacity in bytes (``F_GETPIPE_SZ``)."""
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def set_pipe_capacity(fd: int, size: int) -> int:
    """Grow the pipe to at least ``size`` bytes (``F_SETPIPE_SZ``); return the new size.

    Raises :class:`~pagein.errors.KernelError` when ``size`` exceeds
    ``/proc/sys/fs/pipe-max-size`` for an unprivileged user.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as e:
        raise KernelError(f"F_SETPIPE_SZ({size})", e.errno or 0,
                          "raise sysctl fs.pipe-max-size or ask for less") from e


