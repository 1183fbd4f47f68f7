"""Huge pages after a lazy restore, on the real guest: ranges the handler filled whole
are collapsed (answers unchanged), never one holding a page a REMOVE discarded."""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import ready_serve
from test_restore import Taken, ask, take_snapshot

from pagein.serve.strategies import StrategyName
from pagein.sys.mapping import PAGE_SIZE, Advice
from pagein.sys.pagemap import Pagemap
from pagein.sys.thp import HUGE_BYTES
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore

TIMEOUT = 60.0
_KPF_THP = 1 << 22  # /proc/kpageflags: the page belongs to a transparent huge page


@pytest.fixture(scope="module")
def taken() -> Iterator[Taken]:
    with tempfile.TemporaryDirectory(prefix="pagein-test-collapse-") as d:
        yield take_snapshot(d, 1)


@pytest.fixture
def readahead_server(taken: Taken, tmp_path: Path) -> Iterator[str]:
    """`pagein serve --strategy readahead` as a fleet runs it: serving workers."""
    sock = str(tmp_path / "serve.sock")
    with ready_serve([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                      "--mem-file", os.path.join(taken.directory, "memory"),
                      "--strategy", "readahead", "--collapse", "--workers", "1"], TIMEOUT):
        yield sock


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling the VMM's page tables, which have no fd to wait on


def _all_present(vm: RestoredVm) -> bool:
    return vm.pages_present() == sum(m.length for m in vm.mappings) // PAGE_SIZE


def _thp_pages(address: int, length: int) -> int:
    """Pages of ``[address, +length)`` of this process that are part of a THP."""
    with Pagemap() as pm:
        entries = pm.entries(address, length)
    n = 0
    with open("/proc/kpageflags", "rb") as f:
        for e in entries:
            pfn = e & ((1 << 55) - 1)
            if e >> 63 and pfn:
                f.seek(pfn * 8)
                n += bool(struct.unpack("<Q", f.read(8))[0] & _KPF_THP)
    return n


def _data_ranges(taken: Taken) -> list[int]:
    """Offsets of the 2 MiB ranges of the memory file without an all-zero 4 KiB page."""
    out = []
    with open(os.path.join(taken.directory, "memory"), "rb") as f:
        data = f.read()
    zero = bytes(PAGE_SIZE)
    for off in range(0, len(data) - HUGE_BYTES + 1, HUGE_BYTES):
        if all(data[p:p + PAGE_SIZE] != zero for p in range(off, off + HUGE_BYTES, PAGE_SIZE)):
            out.append(off)
    return out


@pytest.mark.parametrize(("strategy", "collapse"), [
    (StrategyName.POPULATE_ALL, True), (StrategyName.POPULATE_ALL, False),
    (StrategyName.READAHEAD, True)], ids=["populate-all", "populate-all-no-collapse",
                                          "readahead-server"])
def test_restores_exactly_on_huge_pages_only_with_collapse(
        taken: Taken, strategy: StrategyName, collapse: bool,
        request: pytest.FixtureRequest) -> None:
    if strategy is StrategyName.READAHEAD:  # through a running server and its worker
        opts = RestoreOptions(backend=Backend.UFFD,
                              uffd_socket=request.getfixturevalue("readahead_server"))
    else:  # through the handler pagein vm restore spawns for one VM
        opts = RestoreOptions(backend=Backend.UFFD, strategy=strategy, collapse=collapse)
    with restore(taken.directory, opts) as vm:
        assert ask(vm.machine, taken.requests[:1]) == taken.answers[:1]
        # The guest idles between requests, as a function does: the handler has looked
        # for completed ranges by now, and must look again for those completed later.
        time.sleep(0.3)
        assert ask(vm.machine, taken.requests[1:]) == taken.answers[1:]  # checksum: all
        if strategy is StrategyName.POPULATE_ALL:
            _wait(lambda: _all_present(vm), "populate-all to finish")
        if collapse:
            # Every range holding only snapshot data was filled (readahead: by the faults
            # of the checksum, served without the session seeing them one by one).
            want = len(_data_ranges(taken)) * HUGE_BYTES
            assert want > 0
            _wait(lambda: vm.huge_bytes() >= want, f"{want >> 20} MiB of huge pages")
        else:
            time.sleep(0.3)  # what a collapse would need after the last fill, several times
            assert vm.huge_bytes() == 0
        # Still the same guest, huge pages or not.
        assert ask(vm.machine, taken.requests) == taken.answers
        vm.machine.console.close_input()
        assert vm.wait(TIMEOUT).status == 0


def test_a_range_with_a_removed_page_is_never_collapsed_and_reads_zeros(taken: Taken) -> None:
    ranges = _data_ranges(taken)
    assert len(ranges) >= 2
    # Ranges are collapsed in address order: once every later one is, the first would
    # have been too.
    victim, others = ranges[0], ranges[1:]
    page = victim + 5 * PAGE_SIZE
    with open(os.path.join(taken.directory, "memory"), "rb") as f:
        f.seek(page)
        original = f.read(PAGE_SIZE)
    opts = RestoreOptions(backend=Backend.UFFD, strategy=StrategyName.READAHEAD, collapse=True)
    with restore(taken.directory, opts) as vm:
        (m,) = vm.mappings
        # A balloon takes the page back before the guest touched its range (readahead
        # fills on faults only): the handler reads the REMOVE; the page must read zeros.
        m.madvise(Advice.DONTNEED, page, PAGE_SIZE)
        assert vm.machine.memory.read(page, PAGE_SIZE) == bytes(PAGE_SIZE)
        # Put the snapshot's bytes back through the VMM (an ordinary anonymous page now,
        # which the kernel would collapse if asked): the guest answers as the original.
        vm.machine.memory.write(page, original)
        assert ask(vm.machine, taken.requests) == taken.answers  # checksum reads it all
        _wait(lambda: all(_thp_pages(m.address + r, HUGE_BYTES) == HUGE_BYTES // PAGE_SIZE
                          for r in others), "every other data range to be collapsed")
        assert _thp_pages(m.address + victim, HUGE_BYTES) == 0
        assert vm.machine.memory.read(page, PAGE_SIZE) == original
        vm.machine.console.close_input()
        assert vm.wait(TIMEOUT).status == 0
