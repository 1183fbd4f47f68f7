"""The C fault core (pagein.serve._core) on real userfaultfd, verified byte for byte.

A forked toucher (tests/kernel/_toucher.py) owns the registered memory and the uffd, as
a VMM does; this process runs the core against it. The snapshot is a real file mapped
here; every page the toucher reads back is compared with it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _toucher import Toucher, pattern, wait_for_fault_waiters

from pagein._abi import libc
from pagein._abi.mman import Advice, Prot
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import CopyMode, Feature
from serve_harness import empty_hugetlb_pool, hugepages

core = pytest.importorskip("pagein.serve._core", reason="the C fault core was not built")

pytestmark = pytest.mark.kernel
P = PAGE_SIZE
HUGE = 2 << 20
REC = struct.Struct("=QQII")
MAX_TURNS = 1000


def _bits(buf: bytearray, first: int, n: int) -> list[int]:
    return [(buf[i >> 3] >> (i & 7)) & 1 for i in range(first, first + n)]


def _digest(data: bytes) -> str:
    """What the toucher's ``digest`` command returns (replies over ~200 KiB do not fit)."""
    return hashlib.sha256(data).hexdigest()


def _set(buf: bytearray, first: int, n: int) -> None:
    for i in range(first, first + n):
        buf[i >> 3] |= 1 << (i & 7)


@dataclass
class Rig:
    """One toucher, a snapshot file mapped here and a core serving the toucher."""

    t: Toucher
    snap: bytes
    snap_map: Mapping
    zeros: Mapping
    core: core.Core
    filled: bytearray
    discarded: bytearray
    holes: bytearray
    counters: array[int] = field(default_factory=lambda: array("Q", [0] * core.N_COUNTERS))

    def c(self, index: int) -> int:
        return self.counters[index]

    def serve(self, *command: object) -> object:
        """Send a command to the toucher and serve faults until it replies.

        Events are applied as session.py applies them (REMOVE marks pages discarded and
        filled); returns the reply. Every other reason fails the test.
        """
        self.t.send(*command)
        for _ in range(MAX_TURNS):
            reason, events, unserved = self.core.run(-1, self.t.sock.fileno(), 5000)
            assert not unserved, unserved
            if reason == core.REASON_SOCKET:
                return self.t.reply()
            if reason == core.REASON_EVENTS:
                self.apply(events)
                continue
            pytest.fail(f"run() returned reason {reason}")
        pytest.fail("the toucher did not reply")

    def apply(self, events: list[tuple[int, int, int, int]]) -> None:
        for code, a, b, _ in events:
            assert code == 0x15, f"unexpected event 0x{code:x}"
            p0, p1 = (a - self.t.address) // P, (b - self.t.address) // P
            _set(self.discarded, p0, p1 - p0)
            _set(self.filled, p0, p1 - p0)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[object]:
    rigs: list[Rig] = []

    def make(snap: bytes, *, readahead: int = 0, holes: list[tuple[int, int]] | None = None,
             record: bool = False, kind: str = "anon", page_size: int = P,
             features: Feature = Feature.EVENT_REMOVE, pagemap_fd: int = -1,
             tripwire: bytearray | None = None) -> Rig:
        path = tmp_path / f"mem{len(rigs)}.snap"
        path.write_bytes(snap)
        with open(path, "rb") as f:
            snap_map = Mapping.of_fd(f.fileno(), len(snap), shared=False, prot=Prot.READ)
        pages = len(snap) // page_size
        t = Toucher.spawn(len(snap), kind=kind, features=features)
        zeros = Mapping.anonymous(HUGE)
        filled, discarded, hole_bits = (bytearray(-(-pages // 8)) for _ in range(3))
        for first, n in holes or []:
            _set(hole_bits, first, n)
        counters = array("Q", [0] * core.N_COUNTERS)
        c = core.Core(t.uffd.fileno(), [(0, len(snap), page_size)], [filled], [discarded],
                      [hole_bits if holes else None], counters, snap_map.address, [],
                      zeros.address, [readahead], 1 << 20, record, None, pagemap_fd,
                      tripwire)
        c.set_extents([(t.address, len(snap), 0, 0)])
        rig = Rig(t, snap, snap_map, zeros, c, filled, discarded, hole_bits, counters)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.core.close()
        rig.t.close()
        rig.snap_map.close()
        rig.zeros.close()


def test_every_page_is_served_from_the_snapshot(make_rig) -> None:
    rig = make_rig(bytes(pattern(16 * P)))
    assert rig.serve("read", 0, 16 * P) == rig.snap
    assert rig.c(core.C_FAULTS) == 16 and rig.c(core.C_PAGES) == 16
    assert rig.c(core.C_BYTES_FAULT) == 16 * P and rig.c(core.C_BYTES_READAHEAD) == 0
    assert _bits(rig.filled, 0, 16) == [1] * 16
    buckets = rig.counters[core.C_LATENCY_BUCKETS:core.C_LATENCY_BUCKETS + 14]
    assert sum(buckets) == 16 and rig.core.deferred == 0
    # Installed pages stay: reading again faults no more.
    assert rig.serve("read", 5 * P, P) == rig.snap[5 * P:6 * P]
    assert rig.c(core.C_FAULTS) == 16


def test_readahead_fills_the_window_and_records_why(make_rig) -> None:
    rig = make_rig(bytes(pattern(32 * P, seed=2)), readahead=8, record=True)
    assert rig.serve("read", 3 * P, P) == rig.snap[3 * P:4 * P]
    assert _bits(rig.filled, 0, 16) == [1] * 8 + [0] * 8
    assert rig.c(core.C_FAULTS) == 1 and rig.c(core.C_PAGES) == 8
    assert rig.c(core.C_BYTES_FAULT) == P and rig.c(core.C_BYTES_READAHEAD) == 7 * P
    # The window is there: reading all of it faults no more, and the bytes are right.
    assert rig.serve("read", 0, 8 * P) == rig.snap[:8 * P]
    assert rig.c(core.C_FAULTS) == 1
    faults, fills = rig.core.take_records()
    assert [(off, tid, zero) for _, off, tid, zero in REC.iter_unpack(faults)] == \
        [(3 * P, 0, 0)]
    got = [(off // P, n, cause) for _, off, n, cause in REC.iter_unpack(fills)]
    # The faulting page, the pages one copy brought with it, then the window's start.
    assert got == [(3, 1, core.CAUSE_DEMAND), (4, 4, core.CAUSE_READAHEAD),
                   (0, 3, core.CAUSE_READAHEAD)]
    assert rig.core.take_records() == (b"", b"")


def test_long_holes_become_zero_pages_and_short_ones_are_copied(make_rig) -> None:
    snap = bytearray(pattern(64 * P, seed=3))
    snap[16 * P:48 * P] = bytes(32 * P)  # a long hole
    snap[50 * P:54 * P] = bytes(4 * P)  # a short one
    rig = make_rig(bytes(snap), readahead=64, holes=[(16, 32), (50, 4)])
    assert rig.serve("read", 0, P) == rig.snap[:P]
    assert _bits(rig.filled, 0, 64) == [1] * 64
    assert rig.c(core.C_ZERO_PAGES) == 32 and rig.c(core.C_PAGES) == 64
    assert rig.c(core.C_BYTES_FAULT) == P and rig.c(core.C_BYTES_READAHEAD) == 31 * P
    assert rig.serve("digest", 0, 64 * P) == _digest(rig.snap)
    assert rig.c(core.C_FAULTS) == 1


def test_a_fault_on_a_hole_page_maps_zeros(make_rig) -> None:
    snap = bytearray(pattern(4 * P, seed=4))
    snap[2 * P:3 * P] = bytes(P)
    rig = make_rig(bytes(snap), holes=[(2, 1)])
    assert rig.serve("read", 0, 4 * P) == rig.snap
    assert rig.c(core.C_ZERO_PAGES) == 1 and rig.c(core.C_BYTES_FAULT) == 3 * P


def test_a_removed_range_is_an_event_and_then_reads_zeros(make_rig) -> None:
    rig = make_rig(bytes(pattern(8 * P, seed=5)))
    assert rig.serve("read", 0, 8 * P) == rig.snap
    rig.t.send("madvise", 2 * P, 3 * P, int(Advice.DONTNEED))
    reason, events, _ = rig.core.run(-1, -1, 5000)
    assert reason == core.REASON_EVENTS
    assert events == [(0x15, rig.t.address + 2 * P, rig.t.address + 5 * P, 0)]
    assert rig.c(core.C_REMOVES) == 1 and rig.c(core.C_REMOVED_BYTES) == 3 * P
    rig.apply(events)
    assert rig.t.reply() is None
    got = rig.serve("read", 0, 8 * P)
    assert got == rig.snap[:2 * P] + bytes(3 * P) + rig.snap[5 * P:]
    assert rig.c(core.C_ZERO_PAGES) == 3 and rig.c(core.C_FAULTS) == 11


def test_fill_while_an_event_is_unread_says_retry(make_rig) -> None:
    rig = make_rig(bytes(pattern(8 * P, seed=6)))
    assert rig.serve("read", 0, P) == rig.snap[:P]
    rig.t.send("madvise", 0, P, int(Advice.DONTNEED))  # blocks until the event is read
    assert select.select([rig.t.uffd], [], [], 5)[0]
    assert rig.core.fill(0, 0, 8, core.CAUSE_BACKGROUND, False) is False
    assert _bits(rig.filled, 1, 7) == [0] * 7
    reason, events, _ = rig.core.run(-1, -1, 5000)
    assert reason == core.REASON_EVENTS
    rig.apply(events)
    assert rig.t.reply() is None
    assert rig.core.fill(0, 0, 8, core.CAUSE_BACKGROUND, False) is True
    assert rig.c(core.C_BYTES_BACKGROUND) == 7 * P
    assert rig.serve("read", 0, 8 * P) == bytes(P) + rig.snap[P:]
    assert rig.c(core.C_FAULTS) == 2  # only the discarded page faulted (zeros)


def test_fill_over_a_present_page_counts_eexist_and_keeps_it(make_rig) -> None:
    rig = make_rig(bytes(pattern(4 * P, seed=7)))
    other = bytearray(b"\x77" * P)
    rig.t.uffd.copy(rig.t.address + 2 * P, libc.buffer_address(other), P)
    assert rig.core.fill(0, 0, 4, core.CAUSE_BACKGROUND, False) is True
    assert rig.c(core.C_EEXIST) == 1 and rig.c(core.C_PAGES) == 3
    assert _bits(rig.filled, 0, 4) == [1] * 4
    assert rig.serve("read", 0, 4 * P) == rig.snap[:2 * P] + bytes(other) + rig.snap[3 * P:]
    assert rig.c(core.C_FAULTS) == 0


def test_a_fault_on_a_page_installed_meanwhile_is_woken(make_rig) -> None:
    rig = make_rig(bytes(pattern(2 * P, seed=8)))
    other = bytearray(b"\x42" * P)
    rig.t.send("read", 0, P)
    wait_for_fault_waiters(rig.t.pid, 1)
    # A racing filler installed the page without waking the thread.
    rig.t.uffd.copy(rig.t.address, libc.buffer_address(other), P, CopyMode.DONTWAKE)
    reason, _, _ = rig.core.run(-1, rig.t.sock.fileno(), 5000)
    assert reason == core.REASON_SOCKET
    assert rig.t.reply() == bytes(other)
    assert rig.c(core.C_EEXIST) == 1 and rig.c(core.C_FAULTS) == 1


def test_dontwake_fills_wake_only_at_wake_installed(make_rig) -> None:
    rig = make_rig(bytes(pattern(8 * P, seed=9)))
    rig.t.send("read", 0, P)
    wait_for_fault_waiters(rig.t.pid, 1)
    assert rig.core.fill(0, 0, 4, core.CAUSE_PREFETCH, True) is True
    assert not select.select([rig.t.sock], [], [], 0.1)[0]  # still asleep
    rig.core.wake_installed()
    assert rig.t.reply() == rig.snap[:P]
    # The wake took the unread fault message off the uffd's queue with the waiter.
    assert rig.core.run(-1, -1, 0)[0] == core.REASON_IDLE
    assert rig.c(core.C_FAULTS) == 0 and rig.c(core.C_PAGES) == 4
    rig.core.wake_installed()  # nothing left to wake
    assert rig.serve("read", 0, 8 * P) == rig.snap


def test_a_fault_outside_every_extent_is_unserved(make_rig) -> None:
    rig = make_rig(bytes(pattern(4 * P, seed=10)))
    rig.core.set_extents([(rig.t.address, 2 * P, 0, 0)])
    rig.t.send("read", 3 * P, P)
    reason, _, unserved = rig.core.run(-1, -1, 5000)
    assert reason == core.REASON_UNSERVED
    assert [u[0] for u in unserved] == [rig.t.address + 3 * P]
    rig.core.set_extents([(rig.t.address, 4 * P, 0, 0)])
    assert rig.core.fill(0, 3, 1, core.CAUSE_BACKGROUND, False) is True
    assert rig.t.reply() == rig.snap[3 * P:]


def test_a_remapped_extent_is_served_at_its_new_address(make_rig) -> None:
    rig = make_rig(bytes(pattern(4 * P, seed=11)), features=Feature.EVENT_REMAP)
    rig.t.send("mremap")
    reason, events, _ = rig.core.run(-1, -1, 5000)
    assert reason == core.REASON_EVENTS
    assert events == [(0x14, rig.t.address, rig.t.spare, 4 * P)]
    assert rig.c(core.C_REMAPS) == 1
    rig.core.set_extents([(rig.t.spare, 4 * P, 0, 0)])
    assert rig.t.reply() == rig.t.spare
    rig.t.address = rig.t.spare
    assert rig.serve("read", 0, 4 * P) == rig.snap


def test_stop_idle_and_socket_reasons(make_rig) -> None:
    rig = make_rig(bytes(pattern(2 * P, seed=12)))
    r, w = os.pipe()
    try:
        assert rig.core.run(r, -1, 0)[0] == core.REASON_IDLE
        assert rig.core.run(r, -1, 1)[0] == core.REASON_IDLE
        os.write(w, b"x")
        assert rig.core.run(r, -1, -1)[0] == core.REASON_STOP
        rig.t.send("exit")  # the toucher hangs up its socket
        assert rig.core.run(-1, rig.t.sock.fileno(), -1)[0] == core.REASON_SOCKET
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.hugetlb
def test_hugetlb_pages_are_copied_and_discarded_ones_zeroed(make_rig) -> None:
    # the toucher maps the region and a spare of the same size: 4 pages, plus one spare
    with hugepages(4) as enough:
        if not enough:
            pytest.skip("cannot raise vm.nr_hugepages to get 4 free 2 MiB pages")
        rig = make_rig(bytes(pattern(2 * HUGE, seed=13)), kind="hugetlb", page_size=HUGE)
        _set(rig.discarded, 1, 1)
        got = rig.serve("digest", 0, 2 * HUGE)
        assert got == _digest(rig.snap[:HUGE] + bytes(HUGE))
        assert rig.c(core.C_ZERO_PAGES) == 1 and rig.c(core.C_BYTES_FAULT) == HUGE
        rig.core.close()
        rig.t.close()


def test_no_fill_is_issued_once_the_tripwire_is_set(make_rig) -> None:
    tripwire = bytearray(8)
    rig = make_rig(bytes(pattern(4 * P, seed=21)), tripwire=tripwire)
    assert rig.core.fill(0, 0, 2, core.CAUSE_BACKGROUND, False) is True
    tripwire[0] = 1  # the memory file changed (pagein.serve.guard)
    with pytest.raises(OSError) as info:
        rig.core.fill(0, 2, 2, core.CAUSE_BACKGROUND, False)
    assert info.value.errno == errno.ESTALE
    assert "the memory file changed while it was served" in str(info.value)
    assert _bits(rig.filled, 0, 4) == [1, 1, 0, 0] and rig.c(core.C_PAGES) == 2
    with Pagemap(rig.t.pid) as pm:  # nothing of the changed file was installed
        assert pm.summary(rig.t.address + 2 * P, 2 * P).present == 0


@pytest.mark.hugetlb
def test_hugetlb_eexist_is_believed_only_when_the_page_is_there(make_rig) -> None:
    snap = bytes(pattern(2 * HUGE, seed=22))
    with hugepages(4) as enough:  # the region and the toucher's spare
        if not enough:
            pytest.skip("cannot raise vm.nr_hugepages to get 4 free 2 MiB pages")
        rig = make_rig(snap, kind="hugetlb", page_size=HUGE)
        other = Mapping.anonymous(HUGE)
        rig.t.uffd.copy(rig.t.address, other.address, HUGE)  # a racing fill won page 0
        other.close()
    pagemap = os.open(f"/proc/{rig.t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        rig.core.close()
        rig.core = core.Core(
            rig.t.uffd.fileno(), [(0, len(snap), HUGE)], [rig.filled], [rig.discarded],
            [None], rig.counters, rig.snap_map.address, [], rig.zeros.address, [0], 1 << 20,
            False, None, pagemap)
        rig.core.set_extents([(rig.t.address, len(snap), 0, 0)])
        assert rig.core.fill(0, 0, 1, core.CAUSE_BACKGROUND, False) is True
        assert rig.c(core.C_EEXIST) == 1  # present in the pagemap: a real EEXIST
        # Page 1 cannot be allocated: the kernel says EEXIST, the pagemap says absent.
        with empty_hugetlb_pool(), pytest.raises(OSError) as info:
            rig.core.fill(0, 1, 1, core.CAUSE_BACKGROUND, False)
        assert info.value.errno == errno.ENOMEM
        assert "said EEXIST but the VMM has no page there" in str(info.value)
        assert "raise vm.nr_hugepages" in str(info.value)
        assert _bits(rig.filled, 0, 2) == [1, 0] and rig.c(core.C_EEXIST) == 1
    finally:
        rig.core.close()
        os.close(pagemap)


def _args(**over: object) -> list[object]:
    a = {"uffd_fd": 0, "regions": [(0, 8 * P, P)], "filled": [bytearray(1)],
         "discarded": [bytearray(1)], "holes": [None],
         "counters": array("Q", [0] * core.N_COUNTERS),
         "base_address": 0, "overlay": [], "zero_address": 0, "readahead_pages": [0],
         "chunk_bytes": 1 << 20, "record": False}
    a.update(over)
    return list(a.values())


@pytest.mark.parametrize(("over", "error", "words"), [
    ({"regions": [(0, 8 * P, 8192)]}, ValueError, "page size"),
    ({"regions": [(0, 8 * P + 1, P)]}, ValueError, "multiple"),
    ({"regions": [(0, 16 * P, P)]}, ValueError, "needs 2"),
    ({"filled": []}, ValueError, "entries for 1 regions"),
    ({"readahead_pages": [0, 0]}, ValueError, "entries for 1 regions"),
    ({"chunk_bytes": 0}, ValueError, "chunk_bytes"),
    ({"counters": bytearray(8)}, ValueError, "counters"),
    ({"counters": b"\0" * core.N_COUNTERS * 8}, TypeError, "writable buffer"),
    ({"holes": [1]}, TypeError, "contiguous buffer"),
    ({"regions": [(0, 8 * P)]}, TypeError, "tuple of 3"),
    ({"regions": 5}, TypeError, "sequence"),
    ({"base_address": -1}, ValueError, "base_address"),
    ({"overlay": [(P, P, 0), (0, 2 * P, 0)]}, ValueError, "overlay"),
])
def test_bad_constructor_input_is_refused(over: dict[str, object], error: type[Exception],
                                          words: str) -> None:
    with pytest.raises(error, match=words):
        core.Core(*_args(**over))


def test_bad_calls_are_refused_and_close_is_idempotent() -> None:
    c = core.Core(*_args())
    with pytest.raises(ValueError, match="not page-aligned"):
        c.set_extents([(0x1000_0001, P, 0, 0)])
    with pytest.raises(ValueError, match="past the end"):
        c.set_extents([(0x1000_0000, 16 * P, 0, 0)])
    with pytest.raises(ValueError, match="no region"):
        c.set_extents([(0x1000_0000, P, 3, 0)])
    with pytest.raises(ValueError, match="sorted"):
        c.set_extents([(0x2000_0000, P, 0, 0), (0x1000_0000, P, 0, P)])
    with pytest.raises(ValueError, match="outside"):
        c.fill(0, 4, 5, core.CAUSE_BACKGROUND, False)
    with pytest.raises(ValueError, match="cause"):
        c.fill(0, 0, 1, 9, False)
    c.close()
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.run(-1, -1, 0)
    with pytest.raises(ValueError, match="closed"):
        c.take_records()


@pytest.mark.parametrize(("cache", "words"), [
    ((3, 0, 4 * P, bytearray(1), P), "does not fit the page cache of 4 4096-byte pages"),
    ((3, 0, 8 << 20, bytearray(1), 2 << 20), "page size 4096"),
    ((3, 0, 64 * P, bytearray(1), P), "present bitmap has 1 bytes for 64 pages"),
    ((-1, 0, 8 * P, bytearray(1), P), "must be >= 0"),
])
def test_a_page_cache_that_does_not_fit_the_regions_is_refused(
        cache: tuple[object, ...], words: str) -> None:
    # --share-pages: a fault would otherwise write past the cache or map another page.
    with pytest.raises(ValueError, match=words):
        core.Core(*_args(), cache=cache)
