"""The working-set file: the pages a restored guest touched, ready to prefetch in one read.

A restore recorded with ``pagein serve --record FILE`` writes, when its VM goes, the
pages the guest faulted on, merged into runs in the order they were first touched. The
snapshot's bytes of every data run are stored back to back in that same order, so the
next restore reads them sequentially (one pass over one file) and installs them before
the guest asks. Pages that are all zeros in the snapshot carry no data: they are zero
runs, installed with ``UFFDIO_ZEROPAGE``.

Layout (all integers little-endian)::

    offset  size   field
    0       8      magic "PGWSET\\0\\1"
    8       4      format version, u32 (1)
    12      4      page size in bytes, u32 (4096)
    16      8      size of the snapshot memory file it was recorded from, u64
    24      4      number of runs, u32
    28      4      flags, u32 (0)
    32      8      data offset: where the page data starts (page-aligned), u64
    40      8      data pages, u64
    48      32     SHA-256 of everything from byte 80 to the end of the file
    80      16*n   runs, in first-touch order: offset in the memory file u64,
                   pages u32, kind u32 (0 data, 1 zero)
    ...            zero padding to the data offset
    data    4096*d the data runs' pages, in run order

The file is bound to its snapshot: :func:`load` checks the memory file's size and
compares up to :data:`SAMPLE_PAGES` recorded pages, spread over the working set, with
the memory file's bytes at their offsets. A working set recorded from another snapshot
is refused before any guest is served, as is a truncated or corrupted file.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Self

from pagein._abi.mman import Prot
from pagein.errors import IntegrityError, MappingError, SnapshotFormatError, SourceError
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping

__all__ = ["MAGIC", "PageUnits", "Run", "RunKind", "WorkingSetFile", "WorkingSetSource", "load",
           "load_extents", "merge_runs", "write"]

MAGIC = b"PGWSET\x00\x01"
VERSION = 1
SAMPLE_PAGES = 16
_HEADER = struct.Struct("<8sIIQIIQQ32s")
_RUN = struct.Struct("<QII")


class RunKind(IntEnum):
    DATA = 0
    ZERO = 1


@dataclass(frozen=True, slots=True)
class Run:
    """``pages`` pages at ``offset`` of the memory file; ``data_page``: index in the data."""

    offset: int
    pages: int
    kind: RunKind
    data_page: int = 0

    @property
    def length(self) -> int:
        return self.pages * PAGE_SIZE


def merge_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Merge page offsets in first-touch order into ``(offset, pages)`` runs.

    A page directly after the last page of *any* run so far extends that run, so the
    interleaved sequential streams of several vCPUs become one long run each instead
    of thousands of one-page runs (which would cost one fill ioctl per page at
    prefetch). Runs stay in the order of their first touch; repeats are dropped (only
    the first touch counts); runs are not sorted by address.
    """
    seen: set[int] = set()
    out: list[list[int]] = []
    ends: dict[int, int] = {}  # offset just past a run -> index of that run in ``out``
    for off in pages:
        if off in seen:
            continue
        seen.add(off)
        i = ends.pop(off, None)
        if i is None:
            i = len(out)
            out.append([off, 0])
        out[i][1] += 1
        ends[off + PAGE_SIZE] = i
    return [(o, n) for o, n in out]


class PageUnits:
    """The page size of each part of the memory file: 4 KiB unless a range is given.

    ``huge`` holds ``(offset, size_bytes, page_size)`` of the file ranges that a VM maps
    with larger pages (2 MiB hugetlbfs regions). Such a page is faulted, filled and
    zero-filled whole, so the working set records it whole: a touch anywhere in it
    stands for the aligned page, and it is a zero run only if all of it is zeros.
    """

    def __init__(self, huge: Sequence[tuple[int, int, int]] = ()) -> None:
        self._ranges = sorted((o, o + n, ps) for o, n, ps in huge if ps > PAGE_SIZE)
        self._starts = [lo for lo, _, _ in self._ranges]

    def unit(self, offset: int) -> tuple[int, int]:
        """``(start, size)`` of the page holding ``offset``."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            lo, hi, ps = self._ranges[i]
            if offset < hi:
                start = lo + (offset - lo) // ps * ps
                return start, min(ps, hi - start)
        return offset - offset % PAGE_SIZE, PAGE_SIZE

    def expand(self, touched: Iterable[int]) -> Iterator[int]:
        """The 4 KiB page offsets of every unit touched, in first-touch order (an offset
        outside the large-page ranges is passed on as it is)."""
        for off in touched:
            start, size = self.unit(off)
            if size == PAGE_SIZE:
                yield off
            else:
                yield from range(start, start + size, PAGE_SIZE)


def _split_zero(source: PageSource, offset: int, pages: int,
                units: PageUnits) -> list[tuple[int, int, RunKind]]:
    """Split a run into data and zero pieces, one page unit at a time (a unit is zero
    when it lies in one of the source's holes or its bytes read as zeros)."""
    out: list[tuple[int, int, RunKind]] = []
    end = offset + pages * PAGE_SIZE
    holes = sorted(source.zero_extents(offset, pages * PAGE_SIZE))
    starts = [h for h, _ in holes]
    pos = offset
    while pos < end:
        start, size = units.unit(pos)
        size = min(start + size, end) - pos
        i = bisect.bisect_right(starts, pos) - 1  # holes do not overlap: one can hold it
        if i >= 0 and pos + size <= holes[i][0] + holes[i][1]:
            zero = True
        else:
            buf = bytearray(size)
            source.read_into(pos, memoryview(buf))
            zero = buf.count(0) == size
        kind = RunKind.ZERO if zero else RunKind.DATA
        n = size // PAGE_SIZE
        if out and out[-1][2] is kind:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        else:
            out.append((pos, n, kind))
        pos += size
    return out


def write(path: str, source: PageSource, touched: Iterable[int],
          huge: Sequence[tuple[int, int, int]] = ()) -> int:
    """Write the working set of the page offsets ``touched`` (first-touch order) to ``path``.

    ``huge``: ``(offset, size_bytes, page_size)`` of the file ranges mapped with larger
    pages (see :class:`PageUnits`): a touch there records its whole aligned page. The
    page data comes from ``source`` (the snapshot, never the guest's later writes).
    Written under a temporary name and renamed. Returns the number of data pages.
    """
    units = PageUnits(huge)
    runs: list[tuple[int, int, RunKind]] = []
    for off, n in merge_runs(units.expand(touched)):
        if off < 0 or off % PAGE_SIZE or off + n * PAGE_SIZE > source.size:
            raise SourceError(f"recorded page 0x{off:x} is outside the snapshot memory file "
                              f"{source.describe()} of 0x{source.size:x} bytes")
        runs.extend(_split_zero(source, off, n, units))
    table = b"".join(_RUN.pack(o, n, k) for o, n, k in runs)
    data_offset = -(-(_HEADER.size + len(table)) // PAGE_SIZE) * PAGE_SIZE
    data_pages = sum(n for _, n, k in runs if k is RunKind.DATA)
    tmp = f"{path}.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            body_head = table + bytes(data_offset - _HEADER.size - len(table))
            f.write(bytes(_HEADER.size))
            f.write(body_head)
            digest.update(body_head)
            buf = bytearray(1 << 20)
            for off, n, kind in runs:
                if kind is not RunKind.DATA:
                    continue
                pos, end = off, off + n * PAGE_SIZE
                while pos < end:
                    view = memoryview(buf)[: min(len(buf), end - pos)]
                    source.read_into(pos, view)
                    f.write(view)
                    digest.update(view)
                    pos += len(view)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, VERSION, PAGE_SIZE, source.size, len(runs), 0,
                                 data_offset, data_pages, digest.digest()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return data_pages


class WorkingSetFile:
    """A loaded, checked working-set file, its data mapped read-only. Close it when done."""

    def __init__(self, path: str, memory_size: int, runs: Sequence[Run],
                 data: Mapping | None, data_offset: int) -> None:
        self.path = path
        self.memory_size = memory_size
        self.runs = tuple(runs)
        self._data = data
        self._data_offset = data_offset
        data_runs = [r for r in self.runs if r.kind is RunKind.DATA]
        self._by_offset = sorted(data_runs, key=lambda r: r.offset)
        self._starts = [r.offset for r in self._by_offset]

    @property
    def data_pages(self) -> int:
        return sum(r.pages for r in self.runs if r.kind is RunKind.DATA)

    @property
    def zero_pages(self) -> int:
        return sum(r.pages for r in self.runs if r.kind is RunKind.ZERO)

    def extents(self) -> list[tuple[int, int]]:
        """``(memory-file offset, length)`` of every run, in first-touch order."""
        return [(r.offset, r.length) for r in self.runs]

    def data_address(self, offset: int, length: int) -> int | None:
        """The address of the recorded bytes of ``[offset, offset+length)``, or None when
        the range is not inside one data run.

        Safety: valid until :meth:`close`; read only (the mapping is PROT_READ).
        """
        if self._data is None:
            return None
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        r = self._by_offset[i]
        if offset + length > r.offset + r.length:
            return None
        return (self._data.address + self._data_offset + r.data_page * PAGE_SIZE
                + offset - r.offset)

    def data_ranges(self) -> list[tuple[int, int, int]]:
        """``(offset, length, address)`` of every data run's recorded bytes, by offset."""
        if self._data is None:
            return []
        base = self._data.address + self._data_offset
        return [(r.offset, r.length, base + r.data_page * PAGE_SIZE) for r in self._by_offset]

    def read_recorded(self, offset: int, buf: memoryview) -> bool:
        """Copy the recorded bytes at ``offset`` into ``buf``; False if not recorded."""
        addr = self.data_address(offset, len(buf))
        if addr is None or self._data is None:
            return False
        buf[:] = self._data.read(addr - self._data.address, len(buf))
        return True

    def page_bytes(self, run: Run, index: int) -> bytes:
        """The recorded bytes of page ``index`` of data run ``run``."""
        addr = self.data_address(run.offset + index * PAGE_SIZE, PAGE_SIZE)
        if addr is None or self._data is None:
            raise ValueError(f"run at 0x{run.offset:x} has no recorded page {index}")
        pos = addr - self._data.address
        return self._data.read(pos, PAGE_SIZE)

    def close(self) -> None:
        """Unmap the data (idempotent)."""
        if self._data is not None:
            self._data.close()
            self._data = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _parse_header(path: str, raw: bytes, file_size: int) -> tuple[int, int, int, int, bytes]:
    """Check the header; return (memory size, runs, data offset, data pages, digest)."""
    if len(raw) < _HEADER.size:
        raise SnapshotFormatError(f"working-set file {path} is truncated: {len(raw)} bytes, "
                                  f"shorter than its {_HEADER.size}-byte header")
    magic, version, page_size, mem_size, nruns, flags, data_off, data_pages, digest = \
        _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SnapshotFormatError(f"{path} is not a pagein working-set file (bad magic "
                                  f"{magic!r}): pass a file written by pagein serve --record")
    if version != VERSION:
        raise SnapshotFormatError(f"working-set file {path} has format version {version}, "
                                  f"this pagein reads version {VERSION} only: record it again")
    if page_size != PAGE_SIZE or flags:
        raise SnapshotFormatError(f"working-set file {path} field page_size/flags holds "
                                  f"{page_size}/{flags}, expected {PAGE_SIZE}/0")
    table_end = _HEADER.size + nruns * _RUN.size
    if data_off % PAGE_SIZE or data_off < table_end:
        raise SnapshotFormatError(f"working-set file {path} field data_offset {data_off} "
                                  f"must be page-aligned and after the {nruns}-run table")
    want = data_off + data_pages * PAGE_SIZE
    if file_size != want:
        raise SnapshotFormatError(f"working-set file {path} is truncated or has trailing bytes: "
                                  f"{file_size} bytes, its header says {want}")
    return mem_size, nruns, data_off, data_pages, digest


def _parse_runs(path: str, raw: bytes, nruns: int, mem_size: int, data_pages: int) -> list[Run]:
    """Check the runs table (after the checksum: a flipped bit is reported as such)."""
    runs: list[Run] = []
    page = 0
    for i in range(nruns):
        off, n, kind = _RUN.unpack_from(raw, _HEADER.size + i * _RUN.size)
        if kind not in (RunKind.DATA, RunKind.ZERO) or n == 0 or off % PAGE_SIZE or \
                off + n * PAGE_SIZE > mem_size:
            raise SnapshotFormatError(f"working-set file {path} field runs[{i}] (offset "
                                      f"0x{off:x}, {n} pages, kind {kind}) is invalid for a "
                                      f"0x{mem_size:x}-byte memory file")
        runs.append(Run(off, n, RunKind(kind), page if kind == RunKind.DATA else 0))
        if kind == RunKind.DATA:
            page += n
    if page != data_pages:
        raise SnapshotFormatError(f"working-set file {path} field data_pages says "
                                  f"{data_pages}, its runs hold {page}")
    return runs


def _check_binding(ws: WorkingSetFile, source: PageSource) -> None:
    if ws.memory_size != source.size:
        raise IntegrityError(f"working-set file {ws.path} was recorded from a "
                             f"{ws.memory_size}-byte memory file, but {source.describe()} has "
                             f"{source.size} bytes: record it again for this snapshot")
    pages = [(r, i) for r in ws.runs if r.kind is RunKind.DATA for i in range(r.pages)]
    step = max(1, len(pages) // SAMPLE_PAGES)
    sample = pages[::step][:SAMPLE_PAGES] + pages[-1:]
    buf = bytearray(PAGE_SIZE)
    for r, i in sample:
        off = r.offset + i * PAGE_SIZE
        source.read_into(off, memoryview(buf))
        if ws.page_bytes(r, i) != buf:
            raise IntegrityError(f"working-set file {ws.path} does not belong to "
                                 f"{source.describe()}: its page at offset 0x{off:x} differs "
                                 "from the memory file's: record it again for this snapshot")


def load(path: str, source: PageSource | None = None) -> WorkingSetFile:
    """Open, verify (checksum of every byte) and map the working-set file ``path``.

    With ``source``, also check that it was recorded from that snapshot. Raises
    :class:`~pagein.errors.SnapshotFormatError` (truncated, not a working-set file, bad
    field) or :class:`~pagein.errors.IntegrityError` (corrupted, other snapshot).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open working-set file {path}: {e.strerror}") from e
    data: Mapping | None = None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, PAGE_SIZE), 0)
        mem_size, nruns, data_off, data_pages, digest = _parse_header(path, head, size)
        try:
            data = Mapping.of_fd(fd, size, shared=True, prot=Prot.READ)
        except MappingError as e:
            raise SourceError(f"cannot map working-set file {path}: {e}") from e
    finally:
        os.close(fd)
    try:
        view = data.view()
        try:
            got = hashlib.sha256(view[_HEADER.size:]).digest()
            table = bytes(view[:_HEADER.size + nruns * _RUN.size])
        finally:
            view.release()
        if got != digest:
            raise IntegrityError(f"working-set file {path} is corrupted: the SHA-256 of its "
                                 "runs and data does not match its header: record it again")
        runs = _parse_runs(path, table, nruns, mem_size, data_pages)
    except BaseException:
        data.close()
        raise
    ws = WorkingSetFile(path, mem_size, runs, data, data_off)
    try:
        if source is not None:
            _check_binding(ws, source)
    except BaseException:
        ws.close()
        raise
    return ws


def load_extents(path: str) -> list[tuple[int, int]]:
    """Return the ``(offset, length)`` runs of a checked working-set file, in touch order."""
    with load(path) as ws:
        return ws.extents()


class WorkingSetSource(PageSource):
    """A page source that serves recorded pages from the working-set file's mapping.

    Ranges inside one recorded data run are read from the working-set data (already
    read once, sequentially, to verify it); everything else from ``base``. Both are the
    snapshot's bytes (:func:`load` checked the binding). Does not own ``base``.
    """

    def __init__(self, base: PageSource, ws: WorkingSetFile) -> None:
        self.base = base
        self.ws = ws
        self.block_size = base.block_size

    @property
    def size(self) -> int:
        return self.base.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        if not self.ws.read_recorded(offset, buf):
            self.base.read_into(offset, buf)

    def address_of(self, offset: int, length: int) -> int | None:
        addr = self.ws.data_address(offset, length)
        return addr if addr is not None else self.base.address_of(offset, length)

    def address_map(self) -> tuple[int | None, list[tuple[int, int, int]]]:
        base, _ = self.base.address_map()
        return base, self.ws.data_ranges()

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.base.zero_extents(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        if self.ws.data_address(offset, length) is None:
            self.base.prefetch(offset, length)

    def describe(self) -> str:
        return f"{self.base.describe()} + working set {self.ws.path}"

    def close(self) -> None:
        self.ws.close()
