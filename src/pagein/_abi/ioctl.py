"""The ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of ``<asm-generic/ioctl.h>``.

Ioctl numbers are computed from ctypes struct sizes, as the kernel headers compute
them from the C structs, so a layout change shows up as a wrong number in the tests.
"""

from __future__ import annotations

import ctypes

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << IOC_DIRSHIFT)
        | (kind << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def io(kind: int, nr: int) -> int:
    """Return ``_IO(kind, nr)``."""
    return _ioc(IOC_NONE, kind, nr, 0)


def ior(kind: int, nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:  # type: ignore[type-arg]
    """Return ``_IOR(kind, nr, struct)``."""
    return _ioc(IOC_READ, kind, nr, ctypes.sizeof(struct))


def iow(kind: int, nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:  # type: ignore[type-arg]
    """Return ``_IOW(kind, nr, struct)``."""
    return _ioc(IOC_WRITE, kind, nr, ctypes.sizeof(struct))


def iowr(kind: int, nr: int, struct: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:  # type: ignore[type-arg]
    """Return ``_IOWR(kind, nr, struct)``."""
    return _ioc(IOC_READ | IOC_WRITE, kind, nr, ctypes.sizeof(struct))
