"""``<linux/userfaultfd.h>``: structs, flags and ioctl numbers.

Layouts and numbers are pinned by ``tests/unit/test_abi_uffd.py`` against a C probe
compiled with the system headers (and, for ioctls newer than Debian 12's 6.1 headers,
against values from the upstream header).
"""

from __future__ import annotations

import ctypes
import enum
from typing import TypeAlias

from pagein._abi.ioctl import io, ior, iowr

u64 = ctypes.c_uint64
s64 = ctypes.c_int64
u32 = ctypes.c_uint32

UFFD_API = 0xAA
UFFDIO = 0xAA
USERFAULTFD_IOC = 0xAA
UFFD_USER_MODE_ONLY = 1
NR_USERFAULTFD_X86_64 = 323
USERFAULTFD_DEVICE = "/dev/userfaultfd"


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("ioctls", u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("zeropage", s64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64)]


class uffdio_continue(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("mapped", s64)]


class uffdio_poison(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("updated", s64)]


class uffdio_move(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("move", s64)]


class _uffd_msg_pagefault(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("flags", u64), ("address", u64), ("ptid", u32)]


class _uffd_msg_fork(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("ufd", u32)]


class _uffd_msg_remap(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("from_", u64), ("to", u64), ("len", u64)]


class _uffd_msg_remove(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("start", u64), ("end", u64)]


class _uffd_msg_reserved(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("reserved1", u64), ("reserved2", u64), ("reserved3", u64)]


class _uffd_msg_arg(ctypes.Union):
    _pack_ = 1
    _fields_ = [
        ("pagefault", _uffd_msg_pagefault),
        ("fork", _uffd_msg_fork),
        ("remap", _uffd_msg_remap),
        ("remove", _uffd_msg_remove),
        ("reserved", _uffd_msg_reserved),
    ]


class uffd_msg(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", u32),
        ("arg", _uffd_msg_arg),
    ]


UFFD_MSG_SIZE = 32
# Wire layout of uffd_msg for struct.Struct: event, 7 bytes reserved, three u64 words.
UFFD_MSG_FORMAT = "<B7xQQQ"


class IoctlNr(enum.IntEnum):
    """``_UFFDIO_*``: the bit of each ioctl in ``uffdio_api.ioctls``/``uffdio_register.ioctls``."""

    REGISTER = 0x00
    UNREGISTER = 0x01
    WAKE = 0x02
    COPY = 0x03
    ZEROPAGE = 0x04
    MOVE = 0x05
    WRITEPROTECT = 0x06
    CONTINUE = 0x07
    POISON = 0x08
    API = 0x3F


class EventType(enum.IntEnum):
    """``UFFD_EVENT_*``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    """``UFFD_PAGEFAULT_FLAG_*``."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*``."""

    NONE = 0
    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class CopyMode(enum.IntFlag):
    """``UFFDIO_COPY_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0
    WP = 1 << 1


class ZeropageMode(enum.IntFlag):
    """``UFFDIO_ZEROPAGE_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0


class WriteprotectMode(enum.IntFlag):
    """``UFFDIO_WRITEPROTECT_MODE_*``."""

    NONE = 0
    WP = 1 << 0
    DONTWAKE = 1 << 1


class ContinueMode(enum.IntFlag):
    """``UFFDIO_CONTINUE_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0
    WP = 1 << 1


class PoisonMode(enum.IntFlag):
    """``UFFDIO_POISON_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0


class MoveMode(enum.IntFlag):
    """``UFFDIO_MOVE_MODE_*``."""

    NONE = 0
    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


UFFDIO_API = iowr(UFFDIO, IoctlNr.API, uffdio_api)
UFFDIO_REGISTER = iowr(UFFDIO, IoctlNr.REGISTER, uffdio_register)
UFFDIO_UNREGISTER = ior(UFFDIO, IoctlNr.UNREGISTER, uffdio_range)
UFFDIO_WAKE = ior(UFFDIO, IoctlNr.WAKE, uffdio_range)
UFFDIO_COPY = iowr(UFFDIO, IoctlNr.COPY, uffdio_copy)
UFFDIO_ZEROPAGE = iowr(UFFDIO, IoctlNr.ZEROPAGE, uffdio_zeropage)
UFFDIO_MOVE = iowr(UFFDIO, IoctlNr.MOVE, uffdio_move)
UFFDIO_WRITEPROTECT = iowr(UFFDIO, IoctlNr.WRITEPROTECT, uffdio_writeprotect)
UFFDIO_CONTINUE = iowr(UFFDIO, IoctlNr.CONTINUE, uffdio_continue)
UFFDIO_POISON = iowr(UFFDIO, IoctlNr.POISON, uffdio_poison)
USERFAULTFD_IOC_NEW = io(USERFAULTFD_IOC, 0x00)


# Every uffd argument struct is a run of 64-bit fields, so ``sys/`` passes them to
# ``fcntl.ioctl`` as bytearrays addressed as u64 words; these give the word of a field
# (a nested ``range`` is its ``start`` word, ``len`` follows) and the struct size.
StructType: TypeAlias = type[ctypes.Structure]


def word(struct: StructType, field: str) -> int:
    """Return the index of ``field`` in ``struct`` counted in 64-bit words."""
    offset: int = getattr(struct, field).offset
    return offset // 8


def size(struct: StructType) -> int:
    """Return ``sizeof(struct)`` in bytes."""
    return ctypes.sizeof(struct)
