"""Every fill ioctl on real memory of a forked toucher, verified byte for byte.

The toucher created the uffd, so every ioctl issued here acts on the toucher's address
space (DESIGN.md): the bytes the toucher reads back prove where the fill landed.
"""

from __future__ import annotations

import errno
import hashlib
import select
import signal
import threading

import pytest
from _toucher import (
    ChildDied,
    Toucher,
    copy_from,
    fault_waiters,
    pattern,
    serve,
    wait_for_fault_waiters,
)

from pagein._abi import libc
from pagein.errors import UffdError
from pagein.sys.mapping import PAGE_SIZE, Mapping, Memfd
from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import (
    AlreadyPresent,
    ContinueMode,
    CopyMode,
    Event,
    Feature,
    Filled,
    IoctlNr,
    PageFault,
    RegisterMode,
    Retry,
    Userfaultfd,
    WriteprotectMode,
)

pytestmark = pytest.mark.kernel
N = 8
P = PAGE_SIZE


def _one_fault(t: Toucher, timeout: float = 5.0) -> PageFault:
    """Wait for the toucher's uffd to report exactly one page fault and return it."""
    r, _, _ = select.select([t.uffd], [], [], timeout)
    assert r, "no fault arrived"
    (ev,) = t.uffd.read_events()
    assert isinstance(ev, PageFault)
    return ev


def _no_reply(t: Toucher) -> bool:
    return not select.select([t.sock], [], [], 0.1)[0]


def test_copy_serves_missing_faults_byte_for_byte() -> None:
    src = pattern(N * P)
    faults: list[PageFault] = []
    with Toucher.spawn(N * P) as t:
        assert {IoctlNr.COPY, IoctlNr.ZEROPAGE, IoctlNr.WAKE} <= t.ioctls
        fill = copy_from(src, t.address)

        def record(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            faults.append(ev)
            fill(u, ev)

        t.send("read", 0, N * P)
        assert serve(t, record) == bytes(src)
        # Served pages stay: a second read faults no more.
        t.send("read", 3 * P, P)
        assert serve(t, record) == bytes(src[3 * P: 4 * P])
    assert sorted(f.address for f in faults) == [t.address + i * P for i in range(N)]
    assert not any(f.write or f.wp or f.minor for f in faults)


def test_copy_of_many_pages_at_once_fills_the_whole_range() -> None:
    src = pattern(N * P, seed=2)
    with Toucher.spawn(N * P) as t:
        # Fill before any fault: no waiter, the pages are simply there afterwards.
        res = t.uffd.copy(t.address, libc.buffer_address(src), N * P)
        assert res == Filled(N * P)
        t.send("read", 0, N * P)
        assert serve(t, None) == bytes(src)


def test_write_fault_is_flagged_and_the_write_lands_on_the_copied_page() -> None:
    src = pattern(P, seed=3)
    seen: list[PageFault] = []
    with Toucher.spawn(2 * P) as t:
        fill = copy_from(src + bytes(P), t.address)

        def record(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            seen.append(ev)
            fill(u, ev)

        t.send("write", 100, b"XYZ")
        serve(t, record)
        t.send("read", 0, P)
        got = serve(t, record)
    assert seen and seen[0].write and not seen[0].wp
    assert got == bytes(src[:100]) + b"XYZ" + bytes(src[103:P])


def test_zeropage_maps_zeros() -> None:
    with Toucher.spawn(N * P) as t:
        t.uffd.copy(t.address, libc.buffer_address(pattern(P)), P)

        def zero(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            assert u.zeropage(ev.address, P) == Filled(P)

        t.send("read", P, (N - 1) * P)
        assert serve(t, zero) == bytes((N - 1) * P)
        # The zero page is present now: a second zeropage or copy reports EEXIST.
        assert t.uffd.zeropage(t.address + P, P) == AlreadyPresent(0)


def test_dontwake_leaves_the_faulting_thread_asleep_until_wake() -> None:
    src = pattern(P, seed=4)
    with Toucher.spawn(P) as t:
        t.send("read", 0, P)
        ev = _one_fault(t)
        # The event is readable a moment before the thread sleeps: wait for the sleep,
        # or a fill could land first and the thread would never need a wake.
        wait_for_fault_waiters(t.pid, 1)
        res = t.uffd.copy(ev.address, libc.buffer_address(src), P, CopyMode.DONTWAKE)
        assert res == Filled(P)
        assert fault_waiters(t.pid) == 1 and _no_reply(t)
        t.uffd.wake(ev.address, P)
        assert t.reply() == bytes(src)


def test_eexist_is_already_present_and_still_needs_a_wake() -> None:
    src = pattern(P, seed=5)
    with Toucher.spawn(P) as t:
        t.send("read", 0, P)
        ev = _one_fault(t)
        wait_for_fault_waiters(t.pid, 1)
        # A racing filler installed the page without waking (DONTWAKE stands in for it).
        assert t.uffd.copy(ev.address, libc.buffer_address(src), P, CopyMode.DONTWAKE) \
            == Filled(P)
        res = t.uffd.copy(ev.address, libc.buffer_address(pattern(P, 9)), P)
        assert res == AlreadyPresent(0)
        assert fault_waiters(t.pid) == 1  # EEXIST woke nobody
        t.uffd.wake(ev.address, P)
        assert t.reply() == bytes(src)  # the first fill won


def test_copy_wp_maps_write_protected_and_unprotect_resolves_the_wp_fault() -> None:
    src = pattern(P, seed=6)
    seen: list[PageFault] = []
    wp_bit: list[bool] = []
    with Toucher.spawn(P, mode=RegisterMode.MISSING | RegisterMode.WP) as t:
        assert IoctlNr.WRITEPROTECT in t.ioctls
        pagemap = Pagemap(t.pid)

        def handle(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            seen.append(ev)
            if not ev.wp:
                u.copy(ev.address, libc.buffer_address(src), P, CopyMode.WP)
            else:
                wp_bit.append(pagemap.pages(ev.address, P)[0].uffd_wp)
                u.writeprotect(ev.address, P, WriteprotectMode.NONE)

        with pagemap:
            t.send("write", 10, b"w")
            serve(t, handle)
            t.send("read", 0, P)
            got = serve(t, handle)
            after = pagemap.pages(t.address, P)[0]
    assert [(f.write, f.wp) for f in seen] == [(True, False), (True, True)]
    assert wp_bit == [True] and not after.uffd_wp and after.present
    assert got == bytes(src[:10]) + b"w" + bytes(src[11:])


def test_writeprotect_on_a_populated_page_traps_the_next_write() -> None:
    src = pattern(2 * P, seed=7)
    seen: list[PageFault] = []
    with Toucher.spawn(2 * P, mode=RegisterMode.MISSING | RegisterMode.WP) as t:
        assert t.uffd.copy(t.address, libc.buffer_address(src), 2 * P) == Filled(2 * P)
        t.uffd.writeprotect(t.address + P, P)  # only the second page

        def unprotect(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            seen.append(ev)
            u.writeprotect(ev.address, P, WriteprotectMode.NONE)

        t.send("write", 0, b"a")  # unprotected page: no fault
        serve(t, unprotect)
        t.send("write", P + 1, b"b")
        serve(t, unprotect)
        t.send("read", 0, 2 * P)
        got = serve(t, unprotect)
    assert [(f.address, f.wp, f.write) for f in seen] == [(t.address + P, True, True)]
    assert got == b"a" + bytes(src[1:P + 1]) + b"b" + bytes(src[P + 2:])


def test_continue_maps_page_cache_pages_on_minor_faults() -> None:
    src = pattern(N * P, seed=8)
    seen: list[PageFault] = []
    with Memfd.create("minor", N * P) as mfd:
        with mfd.map() as alias:
            alias.write(0, src)  # the page cache holds the content; the toucher has no PTEs
        with Toucher.spawn(N * P, kind="memfd", memfd=mfd, features=Feature.MINOR_SHMEM,
                           mode=RegisterMode.MINOR) as t:
            assert IoctlNr.CONTINUE in t.ioctls

            def cont(u: Userfaultfd, ev: Event) -> None:
                assert isinstance(ev, PageFault)
                seen.append(ev)
                assert u.continue_(ev.address, P) == Filled(P)

            t.send("read", 0, N * P)
            got = serve(t, cont)
            # A page already mapped: CONTINUE reports EEXIST.
            assert t.uffd.continue_(t.address, P, ContinueMode.NONE) == AlreadyPresent(0)
    assert got == bytes(src)
    assert len(seen) == N and all(f.minor and not f.write for f in seen)


def test_move_moves_the_source_page_into_the_faulting_range() -> None:
    # UFFDIO_MOVE refuses cross-mm moves, so the faulting side is a GIL-free thread of
    # this process (memmove) and this thread serves it.
    src = pattern(2 * P, seed=10)
    with Mapping.anonymous(2 * P) as dst, Mapping.anonymous(2 * P) as spare, \
            Userfaultfd.open(Feature.MOVE) as uffd:
        uffd.register(dst.address, 2 * P, RegisterMode.MISSING)
        spare.write(0, src)
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(dst.read(0, 2 * P)))
        reader.start()
        try:
            for _ in range(2):
                assert select.select([uffd], [], [], 5.0)[0], "no fault arrived"
                for ev in uffd.read_events():
                    assert isinstance(ev, PageFault)
                    off = ev.address - dst.address
                    assert uffd.move(ev.address, spare.address + off, P) == Filled(P)
        finally:
            uffd.close()  # releases the reader even if an assertion failed
            reader.join(5.0)
        assert out == [bytes(src)]
        assert spare.read(0, 2 * P) == bytes(2 * P)  # the pages left the source


def test_move_from_another_process_is_refused_with_a_clear_error() -> None:
    with Toucher.spawn(P, features=Feature.MOVE) as t, pytest.raises(UffdError) as e:
        t.uffd.move(t.address, t.spare, P)
    assert e.value.errno == errno.EINVAL and "process that created the uffd" in str(e.value)


def test_poison_makes_the_next_access_sigbus() -> None:
    src = pattern(P, seed=11)
    with Toucher.spawn(2 * P, features=Feature.POISON) as t:
        assert t.uffd.copy(t.address, libc.buffer_address(src), P) == Filled(P)
        assert t.uffd.poison(t.address + P, P) == Filled(P)
        t.send("read", 0, P)
        assert serve(t, None) == bytes(src)
        t.send("read", P, 8)
        with pytest.raises(ChildDied) as died:
            serve(t, None)
    assert died.value.signal == signal.SIGBUS


def test_bulk_copy_digest_matches_for_a_large_range() -> None:
    size = 4 << 20
    src = pattern(size, seed=12)
    with Toucher.spawn(size) as t:
        t.send("digest", 0, size)
        assert serve(t, copy_from(src, t.address, 64 * 1024)) == hashlib.sha256(src).hexdigest()


def test_partial_fill_reports_the_bytes_done_as_retry() -> None:
    # Page 1 is present, so a copy of pages 0-1 fills page 0, hits EEXIST on page 1 and
    # returns EAGAIN with copy=4096: the caller learns exactly what landed.
    src = pattern(2 * P, seed=13)
    with Toucher.spawn(2 * P) as t:
        assert t.uffd.copy(t.address + P, libc.buffer_address(src) + P, P) == Filled(P)
        res = t.uffd.copy(t.address, libc.buffer_address(src), 2 * P)
        assert res == Retry(P)
        assert t.uffd.copy(t.address + P, libc.buffer_address(src) + P, P) == AlreadyPresent(0)
        t.send("read", 0, 2 * P)
        assert t.reply() == bytes(src)
