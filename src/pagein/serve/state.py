"""One VM's serving state in shared memory: what is filled, what a balloon discarded, and
the counters — the part of a session that must outlive the process serving it.

The supervisor creates the state in a memfd when a VM connects and keeps it (with the
VM's uffd and socket) for as long as the VM lives; the serving worker it hands the VM to
maps the same memfd and its fault core (native or Python) writes it, one writer at a
time. The supervisor reads the counters for stats and metrics without asking the
worker, and a worker that replaces a dead one takes the bitmaps over as they are.

Layout (host-endian words, every part 64-byte aligned)::

    0     magic "PAGEINVM"
    8     u32 version (2)      u32 regions
    16    u64 attaches (how many workers have served this VM)
    24    u64 extents in the table below (0: the regions where the handshake put them)
    32    reserved (32 bytes)
    64    counters: N_COUNTERS u64 words (see pagein.serve.stats)
    320   journal: 128 uffd_msg slots of 32 bytes (4096 bytes)
    4416  extents: MAX_EXTENTS x (address, length, region, rel) u64
    ...   region 0: filled bitmap   (ceil(pages/8) bytes, padded to 64)
          region 0: discarded bitmap (same size)
          region 1: ...

The journal is where the fault engine read()s uffd messages: a non-fault event (REMOVE,
UNMAP, REMAP) stays there from the moment the kernel hands it over until the session
has applied it, so a worker killed in between leaves it to its successor. The extents
are saved after every UNMAP/REMAP, before the journal is cleared.

A set ``filled`` bit means the page is installed or needs no more work (removed,
unmapped); a set ``discarded`` bit means its snapshot bytes are void (a REMOVE was
read): a later fault there must read zeros.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from pagein.errors import PageinError
from pagein.serve.bitmap import Bitmap, nbytes
from pagein.serve.firecracker import Region
from pagein.serve.stats import N_COUNTERS, CounterBlock
from pagein.sys.mapping import Mapping, Memfd

__all__ = ["JOURNAL_BYTES", "MAX_EXTENTS", "VmState"]

_MAGIC = b"PAGEINVM"
_VERSION = 2
_HEADER = struct.Struct("=8sII")
_U64 = struct.Struct("=Q")
_ATTACHES_AT, _NEXTENTS_AT = 16, 24
_COUNTERS_AT = 64
JOURNAL_BYTES = 128 * 32
#: UNMAP/REMAP can split a region's range; more live pieces than this end the session.
MAX_EXTENTS = 1024
_EXTENT = struct.Struct("=QQQQ")
_JOURNAL_AT = _COUNTERS_AT + -(-N_COUNTERS * 8 // 64) * 64
_EXTENTS_AT = _JOURNAL_AT + JOURNAL_BYTES
_REGIONS_AT = _EXTENTS_AT + MAX_EXTENTS * _EXTENT.size


def _pad(n: int) -> int:
    return -(-n // 64) * 64


def _layout(regions: Sequence[Region]) -> tuple[list[tuple[int, int]], int]:
    """Return each region's (filled, discarded) byte offsets and the total size."""
    at = _REGIONS_AT
    out = []
    for r in regions:
        size = _pad(nbytes(r.pages))
        out.append((at, at + size))
        at += 2 * size
    return out, -(-at // 4096) * 4096


class VmState:
    """The shared serving state of one VM. Create with :meth:`create`, map another
    process's with :meth:`attach`; close releases the views and the mapping."""

    def __init__(self, memfd: Memfd, mapping: Mapping, regions: Sequence[Region]) -> None:
        self.memfd = memfd
        self.regions = tuple(regions)
        self._mapping = mapping
        self._view = mapping.view()
        offsets, _ = _layout(self.regions)
        self.counters = CounterBlock(self._view[_COUNTERS_AT:_JOURNAL_AT])
        self.journal = self._view[_JOURNAL_AT:_EXTENTS_AT]
        self.filled = [Bitmap(r.pages, self._view[f:d]) for r, (f, d) in
                       zip(self.regions, offsets, strict=True)]
        self.discarded = [Bitmap(r.pages, self._view[d:d + (d - f)]) for r, (f, d) in
                          zip(self.regions, offsets, strict=True)]
        self._closed = False

    @classmethod
    def create(cls, regions: Sequence[Region]) -> VmState:
        """Make a zeroed state for ``regions`` in a new memfd."""
        _, size = _layout(regions)
        memfd = Memfd.create("pagein-vm-state", size)
        try:
            mapping = memfd.map(shared=True)
        except BaseException:
            memfd.close()
            raise
        state = cls(memfd, mapping, regions)
        state._view[:_HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, len(regions))
        return state

    @classmethod
    def attach(cls, fd: int, regions: Sequence[Region]) -> VmState:
        """Map the state in memfd ``fd`` (now owned by the result) for ``regions``.

        Raises :class:`PageinError` when the memfd is not a state for these regions.
        """
        _, size = _layout(regions)
        memfd = Memfd(fd, size, hugetlb=False)
        try:
            actual = os.fstat(memfd.fileno()).st_size
            if actual != size:
                raise PageinError(f"serving state memfd {fd} is {actual} bytes, "
                                  f"expected {size} for {len(regions)} regions")
            mapping = memfd.map(shared=True)
        except BaseException:
            memfd.close()
            raise
        state = cls(memfd, mapping, regions)
        magic, version, n = _HEADER.unpack_from(state._view)
        if magic != _MAGIC or version != _VERSION or n != len(regions):
            state.close()
            raise PageinError(f"serving state memfd {fd} is not a version-{_VERSION} state "
                              f"of {len(regions)} regions")
        return state

    @property
    def attaches(self) -> int:
        """How many workers have attached (1 while the first one serves)."""
        return int(_U64.unpack_from(self._view, _ATTACHES_AT)[0])

    def attach_worker(self) -> int:
        """Count one more worker serving this VM; return how many have."""
        n = self.attaches + 1
        _U64.pack_into(self._view, _ATTACHES_AT, n)
        return n

    def save_extents(self, extents: list[tuple[int, int, int, int]]) -> None:
        """Record the live extents (after an UNMAP/REMAP). Raises PageinError when there
        are more than :data:`MAX_EXTENTS`."""
        if len(extents) > MAX_EXTENTS:
            raise PageinError(f"the VM's memory is split into {len(extents)} pieces by "
                              f"munmap/mremap, more than pagein tracks ({MAX_EXTENTS})")
        for i, e in enumerate(extents):
            _EXTENT.pack_into(self._view, _EXTENTS_AT + i * _EXTENT.size, *e)
        _U64.pack_into(self._view, _NEXTENTS_AT, len(extents))

    def load_extents(self) -> list[tuple[int, int, int, int]] | None:
        """The extents last saved, or None when no UNMAP/REMAP ever moved them."""
        n = int(_U64.unpack_from(self._view, _NEXTENTS_AT)[0])
        if n == 0:
            return None
        n = min(n, MAX_EXTENTS)
        return [_EXTENT.unpack_from(self._view, _EXTENTS_AT + i * _EXTENT.size)
                for i in range(n)]

    def complete(self) -> bool:
        """Whether every page of every region is installed (or needs nothing)."""
        return all(b.full() for b in self.filled)

    def fileno(self) -> int:
        return self.memfd.fileno()

    def close(self) -> None:
        """Release every view, unmap, close the memfd (idempotent). Nothing may use
        :attr:`filled`, :attr:`discarded` or :attr:`counters` afterwards."""
        if self._closed:
            return
        self._closed = True
        self.counters.release()
        self.journal.release()
        self.filled.clear()
        self.discarded.clear()
        self._view.release()
        self._mapping.close()
        self.memfd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
