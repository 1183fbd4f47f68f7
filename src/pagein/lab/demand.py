"""Experiment 1 — demand paging: mmap commits nothing, the first touch allocates.

Anonymous memory costs nothing until touched. A read of an untouched page maps the
kernel's shared zero page (one physical page behind every such address: pagemap shows
one PFN); the first write to each page faults again and allocates a real page. With a
transparent huge page (``MADV_HUGEPAGE`` on a 2 MiB-aligned range) one fault maps 512
base pages at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagein.lab._probe import (
    MIB,
    PAGE_SIZE,
    Recorder,
    Row,
    is_zero_page,
    page_pfns,
    read_each_page,
    vma_kib,
    write_each_page,
)
from pagein.sys.mapping import HUGE_PAGE_SIZE, Advice, Mapping

__all__ = ["DemandPaging", "run"]

_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass(frozen=True, slots=True)
class DemandPaging:
    """What demand paging did to ``size_bytes`` of anonymous memory."""

    size_bytes: int
    pages: int
    present_after_mmap: int  # pages present right after mmap (0: nothing committed)
    read_faults: int  # minor faults reading one byte of every page
    pfns_after_read: int  # distinct PFNs after that read (1: the shared zero page)
    read_pfn_is_zero_page: bool  # /proc/kpageflags says that PFN is the zero page
    rss_growth_after_read_kib: int
    write_faults: int  # minor faults writing one byte of every page afterwards
    pfns_after_write: int  # distinct PFNs after the writes (one real page each)
    rss_growth_after_write_kib: int
    thp_setting: str  # /sys/kernel/mm/transparent_hugepage/enabled
    thp_write_faults: int  # faults writing every page of a MADV_HUGEPAGE range
    thp_anon_huge_kib: int  # AnonHugePages of that range afterwards
    rows: tuple[Row, ...]


def _thp_setting() -> str:
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def run(size_bytes: int = 64 * MIB) -> DemandPaging:
    """Map, read, then write ``size_bytes`` of anonymous memory; then the same with THP."""
    rec = Recorder()
    mib = size_bytes // MIB
    with rec.step(f"mmap {mib} MiB anonymous private") as st:
        m = Mapping.anonymous(size_bytes)
        st.address, st.length = m.address, m.length
    with m:
        rss0 = rec.rows()[-1].rss_kib
        with rec.step("read one byte of every page", m.address, m.length) as st:
            data = read_each_page(m.address, m.length)
            st.note = "all zero" if not any(data) else "non-zero bytes!"
        after_read = rec.rows()[-1]
        pfns = set(page_pfns(m.address, m.length))
        zero = len(pfns) == 1 and is_zero_page(pfns.pop())
        rec.annotate(after_read.note + (", the kernel zero page" if zero else ""))
        with rec.step("write one byte of every page", m.address, m.length) as st:
            write_each_page(m.address, m.length, 1)
        after_write = rec.rows()[-1]
        rss_read = after_read.rss_kib - rss0
        rss_write = after_write.rss_kib - rss0
    thp_faults, thp_kib = _thp(rec, size_bytes)
    rows = rec.rows()
    return DemandPaging(
        size_bytes=size_bytes, pages=size_bytes // PAGE_SIZE,
        present_after_mmap=rows[0].present_pages,
        read_faults=after_read.minor_faults, pfns_after_read=after_read.distinct_pfns,
        read_pfn_is_zero_page=zero,
        rss_growth_after_read_kib=rss_read,
        write_faults=after_write.minor_faults, pfns_after_write=after_write.distinct_pfns,
        rss_growth_after_write_kib=rss_write,
        thp_setting=_thp_setting(), thp_write_faults=thp_faults, thp_anon_huge_kib=thp_kib,
        rows=rows)


def _thp(rec: Recorder, size_bytes: int) -> tuple[int, int]:
    """Write every page of a 2 MiB-aligned MADV_HUGEPAGE range; return faults, AnonHuge."""
    # Over-allocate by one huge page so a 2 MiB-aligned range fits inside.
    size = (size_bytes + HUGE_PAGE_SIZE - 1) // HUGE_PAGE_SIZE * HUGE_PAGE_SIZE
    with Mapping.anonymous(size + HUGE_PAGE_SIZE) as m:
        start = (m.address + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1)
        m.madvise(Advice.HUGEPAGE, start - m.address, size)
        with rec.step("THP: write every page (MADV_HUGEPAGE)", start, size):
            write_each_page(start, size, 1)
        huge = vma_kib(start).get("AnonHugePages", 0)
    rec.annotate(f"AnonHugePages {huge // 1024} MiB")
    return rec.last().minor_faults, huge
