"""Experiment 2 — file mappings: MAP_SHARED and MAP_PRIVATE of one file.

Both mappings read the same page-cache pages (pagemap shows the same PFNs). A read
fault maps a whole window of cached pages around the faulting one (fault-around), so a
sequential read takes far fewer faults than pages. The first write to a MAP_PRIVATE
page copies it: the file never changes and the mapping's Private_Dirty grows. Pages
not yet written in the private mapping still show the file — including later writes
to it through the shared mapping: MAP_PRIVATE is not a snapshot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagein.lab._files import scratch_file, snapshot_bytes
from pagein.lab._probe import (
    MIB,
    PAGE_SIZE,
    Recorder,
    Row,
    data_crcs,
    page_pfns,
    read_each_page,
    vma_kib,
    write_each_page,
)
from pagein.sys.mapping import Mapping

__all__ = ["FileMappings", "run"]

_PRIVATE_MARK = 0x77
_SHARED_MARK = 0xEE


@dataclass(frozen=True, slots=True)
class FileMappings:
    """What the page cache and copy-on-write did for one file mapped twice."""

    size_bytes: int
    pages: int
    cached_pages_before: int  # page-cache pages of the file before the cold read (mincore)
    cold_read_major_faults: int
    cold_read_minor_faults: int
    warm_read_faults: int  # faults reading every page of the second mapping
    pages_per_read_fault: float  # > 1: fault-around mapped neighbours too
    same_pfns_after_reads: int  # pages the two mappings share physically
    private_write_faults: int  # writing the first half of the MAP_PRIVATE mapping
    private_dirty_kib: int  # Private_Dirty of the MAP_PRIVATE mapping afterwards
    same_pfns_after_private_write: int
    file_unchanged_after_private_write: bool
    shared_write_faults: int  # writing every page of the MAP_SHARED mapping
    file_changed_by_shared_write: bool
    private_written_pages_kept: int  # private copies that kept their own byte
    private_unwritten_pages_follow_file: int  # untouched private pages showing the new file
    rows: tuple[Row, ...]


def _file_crcs(fd: int, size: int) -> tuple[int, ...]:
    return data_crcs(os.pread(fd, size, 0))


def run(size_bytes: int = 64 * MIB) -> FileMappings:
    """Map one file shared and private; read both, write each, and watch the file."""
    pages = size_bytes // PAGE_SIZE
    half = (pages // 2) * PAGE_SIZE
    snap = snapshot_bytes(size_bytes)
    rec = Recorder()
    with scratch_file(snap) as fd:
        original = data_crcs(snap)
        del snap
        # Drop the file's clean pages from the page cache so the first read goes to disk.
        os.posix_fadvise(fd, 0, size_bytes, os.POSIX_FADV_DONTNEED)
        with Mapping.of_fd(fd, size_bytes, shared=True) as shared, \
                Mapping.of_fd(fd, size_bytes, shared=False) as private:
            cached = shared.resident_pages()  # mincore of a file mapping: the page cache
            with rec.step("MAP_SHARED: read every page (cold cache)", shared.address,
                          size_bytes):
                read_each_page(shared.address, size_bytes)
            cold = rec.last()
            with rec.step("MAP_PRIVATE: read every page (warm)", private.address, size_bytes):
                read_each_page(private.address, size_bytes)
            warm = rec.last()
            same_reads = _same(shared, private)
            rec.annotate(f"{same_reads} pages share a PFN with MAP_SHARED")
            with rec.step("MAP_PRIVATE: write the first half", private.address, size_bytes):
                write_each_page(private.address, half, _PRIVATE_MARK)
            priv_write = rec.last()
            dirty = vma_kib(private.address).get("Private_Dirty", 0)
            same_write = _same(shared, private)
            rec.annotate(f"Private_Dirty {dirty // 1024} MiB; {same_write} PFNs still shared")
            unchanged = _file_crcs(fd, size_bytes) == original
            with rec.step("MAP_SHARED: write every page", shared.address, size_bytes):
                write_each_page(shared.address, size_bytes, _SHARED_MARK)
            shared_write = rec.last()
            file_firsts = os.pread(fd, size_bytes, 0)[::PAGE_SIZE]
            priv_firsts = read_each_page(private.address, size_bytes)
    kept = priv_firsts[:half // PAGE_SIZE].count(_PRIVATE_MARK)
    follow = priv_firsts[half // PAGE_SIZE:].count(_SHARED_MARK)
    return FileMappings(
        size_bytes=size_bytes, pages=pages, cached_pages_before=cached,
        cold_read_major_faults=cold.major_faults, cold_read_minor_faults=cold.minor_faults,
        warm_read_faults=warm.minor_faults + warm.major_faults,
        pages_per_read_fault=round(pages / max(1, warm.minor_faults + warm.major_faults), 1),
        same_pfns_after_reads=same_reads,
        private_write_faults=priv_write.minor_faults, private_dirty_kib=dirty,
        same_pfns_after_private_write=same_write,
        file_unchanged_after_private_write=unchanged,
        shared_write_faults=shared_write.minor_faults,
        file_changed_by_shared_write=file_firsts.count(_SHARED_MARK) == pages,
        private_written_pages_kept=kept, private_unwritten_pages_follow_file=follow,
        rows=rec.rows())


def _same(a: Mapping, b: Mapping) -> int:
    pa, pb = page_pfns(a.address, a.length), page_pfns(b.address, b.length)
    return sum(1 for x, y in zip(pa, pb, strict=True) if x == y and x)
