"""Collapsing filled ranges into huge pages (pagein.serve.collapse) on real userfaultfd.

A toucher child plays the VMM (its own uffd, its own address space); the test is the
handler: it installs pages with UFFDIO_COPY, keeps the serving state's bitmaps as a
session does, and lets a :class:`Collapser` decide which 2 MiB ranges to collapse in the
child, through the child's pidfd. What is checked is what the kernel did (the child's
``AnonHugePages``, the child's bytes), not only what the collapser counted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from _toucher import Event, Toucher, pattern, serve

from pagein._abi import libc
from pagein.serve.bitmap import Bitmap
from pagein.serve.collapse import HUGE_PAGES, Collapser, huge_ranges
from pagein.serve.firecracker import Region
from pagein.serve.space import AddressSpace
from pagein.serve.state import VmState
from pagein.sys.mapping import PAGE_SIZE, Advice
from pagein.sys.thp import HUGE_BYTES, anon_huge_bytes
from pagein.sys.uffd import Feature, PageFault, Remove, Userfaultfd

RANGES = 4
SIZE = (RANGES + 1) * HUGE_BYTES  # one more: the child's mapping may start unaligned


class Rig:
    """A toucher, the snapshot bytes, and the serving state a session would keep."""

    def __init__(self, t: Toucher) -> None:
        self.t = t
        self.src = pattern(SIZE, seed=3)
        self.region = Region(t.address, SIZE, 0)
        self.space = AddressSpace([self.region])
        self.state = VmState.create([self.region])
        self.holes: list[Bitmap | None] = [Bitmap(self.region.pages)]
        self.ranges = huge_ranges(self.space)
        assert len(self.ranges) >= RANGES

    def install(self, page: int, pages: int) -> None:
        """UFFDIO_COPY pages into the child and mark them filled (what an engine does)."""
        self.t.uffd.copy(self.t.address + page * PAGE_SIZE,
                         libc.buffer_address(self.src) + page * PAGE_SIZE, pages * PAGE_SIZE)
        self.state.filled[0].set(page, pages)
        self.state.counters.add("pages", pages)

    def collapser(self) -> Collapser:
        c = Collapser.of_process(self.t.pid, os.pidfd_open(self.t.pid), self.space,
                                 self.state, self.holes, "vm test")
        assert c is not None
        return c

    def huge(self) -> int:
        return anon_huge_bytes(self.t.pid, self.t.address, self.t.address + SIZE)

    def count(self, name: str) -> int:
        return self.state.counters.get(name)


def _digest(t: Toucher, page: int, pages: int) -> str:
    t.send("digest", page * PAGE_SIZE, pages * PAGE_SIZE)
    return str(t.reply())


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _settle(c: Collapser) -> None:
    """Turn until nothing is left to collapse (each turn collapses at most one)."""
    for _ in range(4 * RANGES + 4):
        c.turn(idle=True)
        if not c.backlog:
            return
    raise AssertionError("the collapser never ran out of work")


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Toucher.spawn(SIZE, features=Feature.EVENT_REMOVE) as t:
        r = Rig(t)
        try:
            yield r
        finally:
            r.state.close()


def _zeros_on_fault(uffd: Userfaultfd, ev: Event) -> None:
    if isinstance(ev, PageFault):
        uffd.zeropage(ev.address & ~(PAGE_SIZE - 1), PAGE_SIZE)


def test_only_ranges_wholly_installed_with_data_are_collapsed(rig: Rig) -> None:
    full, removed, holed, short = (r.first_page for r in rig.ranges[:RANGES])
    rig.install(full, HUGE_PAGES)
    rig.install(removed, HUGE_PAGES)
    # A balloon discards one page of the second range: the session marks it discarded
    # (and filled: nothing to copy there). Its pte is gone, it must read zeros.
    rig.t.send("madvise", (removed + 7) * PAGE_SIZE, PAGE_SIZE, int(Advice.DONTNEED))
    assert _read_remove(rig)
    rig.state.discarded[0].set(removed + 7)
    # A hole of the memory file in the third: served by the zero page.
    rig.install(holed, 3)
    rig.t.uffd.zeropage(rig.t.address + (holed + 3) * PAGE_SIZE, PAGE_SIZE)
    rig.state.filled[0].set(holed + 3)
    assert rig.holes[0] is not None
    rig.holes[0].set(holed + 3)
    rig.install(holed + 4, HUGE_PAGES - 4)
    rig.install(short, HUGE_PAGES - 1)  # one page still missing
    c = rig.collapser()
    try:
        _settle(c)
    finally:
        c.close()
    assert (rig.count("collapsed"), rig.count("collapse_failed")) == (1, 0)
    assert rig.huge() == HUGE_BYTES  # the kernel agrees: one huge page, the first range
    assert _digest(rig.t, full, HUGE_PAGES) == _sha(
        rig.src[full * PAGE_SIZE:(full + HUGE_PAGES) * PAGE_SIZE])
    # The discarded page still faults to the handler and reads zeros.
    rig.t.send("read", (removed + 7) * PAGE_SIZE, PAGE_SIZE)
    assert serve(rig.t, _zeros_on_fault) == bytes(PAGE_SIZE)


def _read_remove(rig: Rig) -> list[Remove]:
    """Read the REMOVE the child's madvise waits on, then its reply."""
    got: list[Remove] = []

    def on(uffd: Userfaultfd, ev: Event) -> None:
        if isinstance(ev, Remove):
            got.append(ev)

    serve(rig.t, on)
    return got


def test_the_kernel_refuses_a_missing_page_even_if_the_bitmap_says_filled(rig: Rig) -> None:
    r = rig.ranges[0].first_page
    rig.install(r, 100)
    rig.install(r + 101, HUGE_PAGES - 101)
    rig.state.filled[0].set(r + 100)  # a lie: page 100 was never installed
    c = rig.collapser()
    try:
        _settle(c)
    finally:
        c.close()
    assert (rig.count("collapsed"), rig.count("collapse_failed")) == (0, 1)
    assert rig.huge() == 0
    # Never bypassed: the missing page faults to the handler, which installs the snapshot.
    rig.t.send("read", (r + 100) * PAGE_SIZE, PAGE_SIZE)
    src = libc.buffer_address(rig.src)

    def copy(uffd: Userfaultfd, ev: Event) -> None:
        if isinstance(ev, PageFault):
            a = ev.address & ~(PAGE_SIZE - 1)
            uffd.copy(a, src + a - rig.t.address, PAGE_SIZE)

    got = serve(rig.t, copy)
    assert got == bytes(rig.src[(r + 100) * PAGE_SIZE:(r + 101) * PAGE_SIZE])


def test_a_remove_inside_a_collapsed_huge_page_reads_zeros_and_faults_again(rig: Rig) -> None:
    r = rig.ranges[1].first_page
    rig.install(r, HUGE_PAGES)
    c = rig.collapser()
    try:
        _settle(c)
        assert rig.huge() == HUGE_BYTES
        rig.t.send("madvise", (r + 9) * PAGE_SIZE, PAGE_SIZE, int(Advice.DONTNEED))
        assert _read_remove(rig)
        rig.state.discarded[0].set(r + 9)
        assert rig.huge() == 0  # split by the zap
        rig.t.send("read", (r + 9) * PAGE_SIZE, PAGE_SIZE)
        assert serve(rig.t, _zeros_on_fault) == bytes(PAGE_SIZE)
        c.turn(idle=True)  # never collapsed again: a page of it is discarded
        assert not c.backlog
    finally:
        c.close()
    assert rig.count("collapsed") == 1
    assert rig.huge() == 0
    assert _digest(rig.t, r, 9) == _sha(rig.src[r * PAGE_SIZE:(r + 9) * PAGE_SIZE])
    assert _digest(rig.t, r + 10, HUGE_PAGES - 10) == _sha(
        rig.src[(r + 10) * PAGE_SIZE:(r + HUGE_PAGES) * PAGE_SIZE])


def test_a_vmm_that_marks_its_memory_nohugepage_is_left_alone(rig: Rig,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    rig.t.send("madvise", 0, SIZE, int(Advice.NOHUGEPAGE))
    rig.t.reply()
    caplog.set_level("INFO", logger="pagein.serve")
    assert Collapser.of_process(rig.t.pid, os.pidfd_open(rig.t.pid), rig.space, rig.state,
                                rig.holes, "vm test") is None
    assert "is marked MADV_NOHUGEPAGE" in caplog.text


def test_huge_ranges_are_the_aligned_2mib_pieces_of_each_live_extent() -> None:
    base = 0x7F0000000000
    space = AddressSpace([Region(base + 4096, 3 * HUGE_BYTES, 0),
                          Region(base + 8 * HUGE_BYTES, HUGE_BYTES, 3 * HUGE_BYTES + 4096),
                          Region(base + 16 * HUGE_BYTES, 2 * HUGE_BYTES, 0, HUGE_BYTES)])
    got = [(r.region, r.first_page, r.address - base) for r in huge_ranges(space)]
    # Region 0 starts one page past a boundary: two whole ranges fit, from its page 511.
    # Region 1 is one aligned range. Region 2 is hugetlb: nothing to collapse.
    assert got == [(0, 511, HUGE_BYTES), (0, 1023, 2 * HUGE_BYTES), (1, 0, 8 * HUGE_BYTES)]
    space.unmap(base + HUGE_BYTES, base + HUGE_BYTES + 4096)  # cut the first range
    assert [(r.region, r.first_page) for r in huge_ranges(space)] == [(0, 1023), (1, 0)]


def test_a_worker_taking_over_collapses_what_is_complete_without_counting_it_again(
        rig: Rig) -> None:
    first, second = rig.ranges[0].first_page, rig.ranges[1].first_page
    rig.state.attach_worker()
    rig.install(first, HUGE_PAGES)
    dead = rig.collapser()  # the first worker: collapses, counts, dies
    _settle(dead)
    dead.close()
    assert rig.count("collapsed") == 1
    rig.state.attach_worker()  # its successor cannot tell what was collapsed
    c = rig.collapser()
    try:
        _settle(c)
        assert rig.count("collapsed") == 1 and rig.huge() == HUGE_BYTES
        rig.install(second, HUGE_PAGES)  # completed after the takeover: counted
        _settle(c)
    finally:
        c.close()
    assert (rig.count("collapsed"), rig.count("collapse_failed")) == (2, 0)
    assert rig.huge() == 2 * HUGE_BYTES
