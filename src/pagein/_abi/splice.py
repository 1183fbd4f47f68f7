"""``<fcntl.h>`` splice family: ``vmsplice(2)`` and its ``struct iovec`` (x86-64)."""

from __future__ import annotations

import ctypes
import enum

from pagein._abi.libc import iovec, libc

__all__ = ["SpliceFlag", "iovec", "vmsplice", "vmsplice_one"]


class SpliceFlag(enum.IntFlag):
    """``SPLICE_F_*``."""

    NONE = 0
    MOVE = 0x01
    NONBLOCK = 0x02
    MORE = 0x04
    GIFT = 0x08


# ssize_t vmsplice(int fd, const struct iovec *iov, size_t nr_segs, unsigned int flags);
vmsplice = libc.vmsplice
vmsplice.restype = ctypes.c_ssize_t
vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_size_t, ctypes.c_uint]


def vmsplice_one(fd: int, address: int, length: int, flags: int) -> int:
    """Call ``vmsplice`` with a single iovec; return its result (-1 and errno on failure)."""
    iov = iovec(address, length)
    return int(vmsplice(fd, ctypes.byref(iov), 1, flags))
