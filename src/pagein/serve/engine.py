"""The per-fault data plane behind one interface: the native core or the Python engine.

A fault *engine* owns everything that happens per fault: reading batches of uffd
messages, locating the faulting page, choosing zeros or data and the readahead window,
``UFFDIO_COPY`` / ``ZEROPAGE`` / ``WAKE`` and their EEXIST/EAGAIN outcomes, counters, the
latency histogram and the fault records. Everything else — events that change the
address space, strategies and their plans, the VMM socket, stats export — is the
session's (:mod:`pagein.serve.session`), which calls an engine like this::

    reason, events, unserved = engine.run(stop_fd, sock_fd, timeout_ms)

``run`` serves faults until something needs the session (a :class:`Reason`); ``fill``
installs a planned span; both work on the VM's shared :class:`~pagein.serve.state.VmState`.

Two engines implement it: ``native`` (:mod:`pagein.serve._core`, a C extension built at
install, which runs with the GIL released, so VMs are served in parallel on every core)
and ``python`` (:mod:`pagein.serve.install`, the reference: the same rules in Python).
``native`` is the default; when the extension is not built, the python engine is used
and :func:`pagein.serve.session.choose` says why once.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pagein.serve.cause import Cause

__all__ = ["CoreEvent", "Engine", "EngineName", "FaultRecord", "FillRecord", "Reason",
           "decode_records"]

_RECORD = struct.Struct("=QQII")


class Reason(enum.IntEnum):
    """Why :meth:`Engine.run` returned (the native core's ``REASON_*`` values)."""

    STOP = 1  # the stop fd became readable
    SOCKET = 2  # the VMM socket is readable or hung up
    EVENTS = 3  # non-fault events were read: apply them, then call run again
    IDLE = 4  # the timeout expired (with 0: after at most one batch)
    UNSERVED = 5  # faults outside every live extent
    RECORDS = 6  # the record buffers are large: drain them
    PEER_GONE = 7  # ESRCH: the VMM's address space is gone
    POLLERR = 8  # the uffd polls as an error: blocking, or UFFDIO_API never completed


class CoreEvent(enum.IntEnum):
    """Non-fault uffd events as engines return them (the kernel's ``UFFD_EVENT_*``).

    Each comes as ``(code, a, b, c)``: FORK (child uffd fd, now the caller's), REMAP
    (from, to, length), REMOVE (start, end), UNMAP (start, end).
    """

    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class EngineName(enum.Enum):
    NATIVE = "native"
    PYTHON = "python"

    @classmethod
    def default(cls) -> EngineName:
        """``native``, unless the environment says ``PAGEIN_ENGINE=python`` (how the test
        suite runs every serving test again on the Python engine)."""
        value = os.environ.get("PAGEIN_ENGINE", "").strip().lower()
        return cls.PYTHON if value == cls.PYTHON.value else cls.NATIVE


@dataclass(frozen=True, slots=True)
class FaultRecord:
    t_ns: int  # CLOCK_MONOTONIC
    offset: int  # in the memory file
    thread_id: int
    zero: bool


@dataclass(frozen=True, slots=True)
class FillRecord:
    t_ns: int
    offset: int
    pages: int
    cause: Cause


EventTuple = tuple[int, int, int, int]
Unserved = tuple[int, int, int, int]  # (address, flags, thread id, t_read_ns)


class Engine(Protocol):
    """What a session needs of a fault engine (see the module docstring)."""

    @property
    def deferred(self) -> int: ...

    def set_extents(self, extents: Sequence[tuple[int, int, int, int]]) -> None: ...

    def run(self, stop_fd: int, sock_fd: int,
            timeout_ms: int) -> tuple[int, list[EventTuple], list[Unserved]]: ...

    def fill(self, region: int, first_page: int, pages: int, cause: int,
             dontwake: bool) -> bool: ...

    def wake_installed(self) -> None: ...

    def drain(self, timeout_ms: int) -> list[EventTuple]: ...

    def applied(self) -> None: ...

    def wake(self, start: int, length: int) -> None: ...

    def take_records(self) -> tuple[bytes, bytes]: ...

    def close(self) -> None: ...


def decode_records(faults: bytes, fills: bytes) -> tuple[list[FaultRecord], list[FillRecord]]:
    """Turn an engine's packed records (24-byte structs) into values."""
    return ([FaultRecord(t, o, tid, bool(z)) for t, o, tid, z in _RECORD.iter_unpack(faults)],
            [FillRecord(t, o, n, Cause(c)) for t, o, n, c in _RECORD.iter_unpack(fills)])


def pack_record(t_ns: int, offset: int, a: int, b: int) -> bytes:
    return _RECORD.pack(t_ns, offset, a, b)
