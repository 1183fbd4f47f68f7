"""The guest ABI in Python: port numbers and the parameter page.

The C side is ``src/pagein/guest/pagein_guest.h``; a test compares the two. Every port
access is one VM exit, handled by :mod:`pagein.vmm.machine`.

Parameter page (little-endian u64 words at :data:`PARAMS_ADDR`, read-only to the guest)::

    +0x00 magic "PAGEINVM"     +0x08 version        +0x10 mem_size      +0x18 vcpus
    +0x20 heap_start           +0x28 heap_end       +0x30 nargs         +0x38 reserved
    +0x40 args[24]             (workload arguments, meaning set by each workload)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

PARAMS_ADDR = 0x200000
MAGIC = int.from_bytes(b"PAGEINVM", "little")
VERSION = 1
MAX_ARGS = 24
RETRY = -2  # a blocking port call was cut short by a pause: the guest asks again
_HEAD = struct.Struct("<8Q")
BUF = struct.Struct("<QQq")  # struct pg_buf: addr, len, result


class Port(enum.IntEnum):
    PUTC = 0x0500     # out8: one console byte
    WRITE = 0x0504    # out32: address of a pg_buf to write to the console
    READ = 0x0508     # out32: address of a pg_buf to fill with one input line
    READY = 0x050C    # out32: the guest is ready (a natural snapshot point)
    EXIT = 0x0510     # out32: the VM ends with this status
    BARRIER = 0x0514  # in32: wait until every vCPU arrived (RETRY: call again)
    STOP = 0x0518     # out32: this vCPU is done, the others go on


@dataclass(frozen=True, slots=True)
class Params:
    """What the guest finds on its parameter page."""

    mem_size: int
    vcpus: int
    heap_start: int
    heap_end: int
    args: tuple[int, ...] = ()

    def pack(self) -> bytes:
        if len(self.args) > MAX_ARGS:
            raise ValueError(f"at most {MAX_ARGS} workload arguments, got {len(self.args)}")
        head = _HEAD.pack(MAGIC, VERSION, self.mem_size, self.vcpus, self.heap_start,
                          self.heap_end, len(self.args), 0)
        args = [a & (2**64 - 1) for a in self.args] + [0] * (MAX_ARGS - len(self.args))
        return head + struct.pack(f"<{MAX_ARGS}Q", *args)
