"""Guest memory backings: shared memfd seen by a second mapping, hugetlb, and memory
registered with userfaultfd and filled on demand while the guest runs."""

from __future__ import annotations

import os
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _guest import function_at_ready

from pagein.sys.mapping import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, hugetlb_free_pages
from pagein.sys.uffd import AlreadyPresent, Filled, PageFault, RegisterMode, Userfaultfd
from pagein.vmm.image import workload_image
from pagein.vmm.layout import HEAP_START
from pagein.vmm.machine import Machine
from pagein.vmm.memory import Backing, GuestMemory, Region
from pagein.vmm.reference import U64, FunctionReference, mix, scan_line
from pagein.vmm.workloads import Op, Pattern, scan_args

MiB = 1 << 20


def test_shared_backing_is_visible_through_a_second_mapping() -> None:
    size, seed = 4 * MiB, 5
    wa = scan_args(Pattern.SEQUENTIAL, Op.WRITE, size_bytes=size, seed=seed)
    with Machine.create(32 * MiB, 2, backing=Backing.SHARED) as m:
        assert m.memory.memfd is not None
        m.boot(workload_image("scan"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.wait(timeout=60).status == 0
        assert m.console.output().decode().strip() == scan_line(wa.args, 16 * MiB)
        with m.memory.memfd.map() as other:
            pages = np.arange(size // PAGE_SIZE, dtype=U64)
            words = pages * U64(512) + pages % U64(512)
            # Touch t = page p wrote mix(seed + words_in_region + t) into word w(p).
            expected = mix(pages + U64(seed + size // 8))
            heap = np.frombuffer(other.read(HEAP_START, size), dtype=U64)
            assert np.array_equal(heap[words.astype(np.int64)], expected)
            other_words = pages * U64(512) + (pages + U64(1)) % U64(512)
            assert np.array_equal(heap[other_words.astype(np.int64)],
                                  mix(other_words + U64(seed)))  # filled, never touched


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Make sure 12 free 2 MiB pages exist: as root, grow vm.nr_hugepages by the
    shortfall for the test and put it back afterwards."""
    need, sysctl = 12, Path("/proc/sys/vm/nr_hugepages")
    short = need - hugetlb_free_pages()
    before = int(sysctl.read_text())
    if short > 0 and os.geteuid() == 0:
        sysctl.write_text(str(before + short))
    try:
        if hugetlb_free_pages() < need:
            pytest.skip(f"needs {need} free 2 MiB pages: raise vm.nr_hugepages")
        yield need
    finally:
        if short > 0 and os.geteuid() == 0:
            sysctl.write_text(str(before))


@pytest.mark.hugetlb
def test_hugetlb_backing_runs_the_scan(huge_pages: int) -> None:
    mem = huge_pages * HUGE_PAGE_SIZE
    wa = scan_args(Pattern.RANDOM, Op.WRITE, touches=5000, seed=2)
    with Machine.create(mem, 1, backing=Backing.HUGETLB) as m:
        assert m.memory.regions[0].mapping.page_size == HUGE_PAGE_SIZE
        m.boot(workload_image("scan"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.wait(timeout=60).status == 0
        assert m.console.output().decode().strip() == scan_line(wa.args, mem - HEAP_START)


class _Handler(threading.Thread):
    """Serve missing pages of ``dst`` from ``src`` (a Python thread is fine here: the
    faulting accesses happen inside KVM_RUN or ctypes.memmove, without the GIL)."""

    def __init__(self, uffd: Userfaultfd, dst: Mapping, src: Mapping) -> None:
        super().__init__(daemon=True)
        self.uffd, self.dst, self.src = uffd, dst, src
        self.stop_r, self.stop_w = os.pipe()
        self.faults = 0

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.uffd, self.stop_r], [], [], 30)
            if self.stop_r in ready or not ready:
                return
            for event in self.uffd.read_events():
                if isinstance(event, PageFault):
                    page = event.address & ~(PAGE_SIZE - 1)
                    src = self.src.address + (page - self.dst.address)
                    result = self.uffd.copy(page, src, PAGE_SIZE)
                    if isinstance(result, AlreadyPresent):
                        self.uffd.wake(page, PAGE_SIZE)
                    assert isinstance(result, Filled | AlreadyPresent)
                    self.faults += 1

    def finish(self) -> None:
        os.write(self.stop_w, b"x")
        self.join(30)
        os.close(self.stop_r)
        os.close(self.stop_w)


def test_restore_through_userfaultfd_fills_pages_on_guest_access() -> None:
    state, seed, mem = 16 * MiB, 4, 48 * MiB
    ref = FunctionReference(state, seed)
    states, image = function_at_ready(state, seed, mem)
    with Mapping.anonymous(mem) as src, Mapping.anonymous(mem) as dst, \
            Userfaultfd.open() as uffd:
        src.write(0, image)
        uffd.register(dst.address, mem, RegisterMode.MISSING)
        handler = _Handler(uffd, dst, src)
        handler.start()
        try:
            with Machine(GuestMemory.from_mappings([Region(0, dst)]), 2) as restored:
                restored.set_vcpu_states(states)
                restored.start()
                restored.console.send(f"get {ref.key(5)}\n")
                assert restored.console.read_line(timeout=60) == ref.answer(f"get {ref.key(5)}")
                few = handler.faults
                restored.console.send("checksum\n")
                assert restored.console.read_line(timeout=60) == ref.answer("checksum")
                restored.console.close_input()
                assert restored.wait(timeout=60).status == 0
        finally:
            handler.finish()
        state_pages = (state + ref.capacity * 4) // PAGE_SIZE
        assert 0 < few < state_pages // 10  # a lookup touches a handful of pages
        assert handler.faults >= state_pages  # the checksum touched all state
        assert struct.unpack_from("<Q", dst.read(HEAP_START, 8))[0] == ref.key(0)
