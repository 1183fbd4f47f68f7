"""Experiment 5 — zero pages and file holes: the cheapest page is one never stored.

Untouched anonymous memory reads as the shared zero page; a uffd handler gets the same
for free with ``UFFDIO_ZEROPAGE``, while ``UFFDIO_COPY`` of zero bytes allocates a real
page for each. File holes cost no disk: reading them through a mapping fills the page
cache with zeroed pages but allocates no blocks, and ``lseek(SEEK_DATA/SEEK_HOLE)``
finds the data without reading a byte — how a restore can skip zero ranges.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagein._abi.libc import buffer_address
from pagein.lab._files import pattern_page, scratch_file
from pagein.lab._probe import MIB, PAGE_SIZE, Recorder, Row, read_each_page
from pagein.lab._procs import FaultHandler, HandlerStats, ZeroPolicy
from pagein.sys.mapping import Mapping, Memfd
from pagein.sys.uffd import RegisterMode, Userfaultfd

__all__ = ["ZeroPages", "run"]

_EXTENT = MIB  # data/hole stripe of the sparse snapshot


@dataclass(frozen=True, slots=True)
class ZeroPages:
    """Where zero pages come from and what each way of producing them costs."""

    size_bytes: int
    pages: int
    anonymous_read_pfns: int  # distinct PFNs reading untouched anonymous memory
    zeropage_pfns: int  # ... after UFFDIO_ZEROPAGE fills
    zeropage_rss_growth_kib: int
    zeropage_handler: HandlerStats
    copy_zeros_pfns: int  # ... after UFFDIO_COPY of a zero buffer
    copy_zeros_rss_growth_kib: int
    copy_zeros_handler: HandlerStats
    hole_file_blocks_before: int  # st_blocks (512 B) of an all-hole file
    hole_read_pfns: int  # distinct PFNs reading it through MAP_PRIVATE
    hole_file_blocks_after: int
    memfd_hole_read_pfns: int  # the same read of a memfd (shmem) hole, MAP_SHARED
    sparse_data_extents: int  # SEEK_DATA/SEEK_HOLE over a file with every other MiB written
    sparse_data_bytes: int
    rows: tuple[Row, ...]


def _uffd_zero(rec: Recorder, label: str, size: int, zero_buffer: int) -> HandlerStats:
    with Mapping.anonymous(size) as m, Userfaultfd.open() as uffd:
        uffd.register(m.address, size, RegisterMode.MISSING)
        with FaultHandler(uffd, ZeroPolicy(zero_buffer), (m.address, size)) as handler:
            with rec.step(label, m.address, size) as st:
                data = read_each_page(m.address, size)
                st.note = "all zero" if not any(data) else "non-zero bytes!"
            stats = handler.stop()
        uffd.unregister(m.address, size)
    return stats


def _extents(fd: int, size: int) -> tuple[int, int]:
    """Walk the file's data extents with SEEK_DATA/SEEK_HOLE: (count, bytes)."""
    count = total = 0
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        count, total, off = count + 1, total + (end - start), end
    return count, total


def run(size_bytes: int = 64 * MIB) -> ZeroPages:
    """Produce zero pages every way and compare PFNs, RSS and disk blocks."""
    rec = Recorder()
    with Mapping.anonymous(size_bytes) as m, \
            rec.step("anonymous: read every page", m.address, size_bytes):
        read_each_page(m.address, size_bytes)
    anon = rec.last()
    zero_buffer = bytearray(PAGE_SIZE)  # alive while handlers run
    zp = _uffd_zero(rec, "uffd ZEROPAGE: guest reads every page", size_bytes, 0)
    zp_row = rec.last()
    cz = _uffd_zero(rec, "uffd COPY of zeros: guest reads every page", size_bytes,
                    buffer_address(zero_buffer))
    cz_row = rec.last()
    with scratch_file(size_bytes=size_bytes) as fd:
        blocks_before = os.fstat(fd).st_blocks
        with Mapping.of_fd(fd, size_bytes, shared=False) as fm, \
                rec.step("sparse file, MAP_PRIVATE: read every page", fm.address, size_bytes):
            read_each_page(fm.address, size_bytes)
        blocks_after = os.fstat(fd).st_blocks
        rec.annotate(f"st_blocks {blocks_before} -> {blocks_after}")
    hole = rec.last()
    with Memfd.create("pagein-lab-hole", size_bytes) as mfd, mfd.map() as mm, \
            rec.step("memfd hole, MAP_SHARED: read every page", mm.address, size_bytes):
        read_each_page(mm.address, size_bytes)
    memfd_hole = rec.last()
    with scratch_file(size_bytes=size_bytes) as fd:
        for off in range(0, size_bytes, 2 * _EXTENT):
            os.pwrite(fd, pattern_page(off // PAGE_SIZE, 1) * (_EXTENT // PAGE_SIZE), off)
        os.fsync(fd)
        extents, data_bytes = _extents(fd, size_bytes)
    base = anon.rss_kib
    return ZeroPages(
        size_bytes=size_bytes, pages=size_bytes // PAGE_SIZE,
        anonymous_read_pfns=anon.distinct_pfns,
        zeropage_pfns=zp_row.distinct_pfns, zeropage_rss_growth_kib=zp_row.rss_kib - base,
        zeropage_handler=zp, copy_zeros_pfns=cz_row.distinct_pfns,
        copy_zeros_rss_growth_kib=cz_row.rss_kib - base, copy_zeros_handler=cz,
        hole_file_blocks_before=blocks_before, hole_read_pfns=hole.distinct_pfns,
        hole_file_blocks_after=blocks_after, memfd_hole_read_pfns=memfd_hole.distinct_pfns,
        sparse_data_extents=extents, sparse_data_bytes=data_bytes, rows=rec.rows())
