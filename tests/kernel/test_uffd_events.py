"""Every non-cooperative event triggered for real, plus fault flags and batching.

madvise/munmap/mremap/fork in the toucher block until the event is read here (the
kernel waits for the handler to acknowledge it), so each command is issued first and
its reply collected by :func:`serve`, which reads events while it waits.
"""

from __future__ import annotations

import os
import select
import signal
import time

import pytest
from _toucher import (
    ChildDied,
    Toucher,
    copy_from,
    pattern,
    serve,
    wait_for_fault_waiters,
)

from pagein._abi import libc
from pagein._abi.mman import Advice
from pagein.sys.mapping import PAGE_SIZE
from pagein.sys.uffd import (
    Event,
    Feature,
    Filled,
    Fork,
    PageFault,
    Remap,
    Remove,
    Retry,
    Unmap,
    Userfaultfd,
)

pytestmark = pytest.mark.kernel
N = 8
P = PAGE_SIZE


def _prefill(t: Toucher, src: bytearray) -> None:
    assert t.uffd.copy(t.address, libc.buffer_address(src), len(src)) == Filled(len(src))


def test_madvise_dontneed_sends_remove_and_the_range_must_then_read_zeros() -> None:
    src = pattern(N * P)
    events: list[Event] = []
    removed: list[tuple[int, int]] = []
    with Toucher.spawn(N * P, features=Feature.EVENT_REMOVE) as t:
        _prefill(t, src)
        fill = copy_from(src, t.address)

        def handle(u: Userfaultfd, ev: Event) -> None:
            events.append(ev)
            if isinstance(ev, Remove):
                removed.append((ev.start, ev.end))
            elif isinstance(ev, PageFault):
                # A removed page must read zeros, never the stale snapshot page.
                if any(s <= ev.address < e for s, e in removed):
                    assert u.zeropage(ev.address, P) == Filled(P)
                else:
                    fill(u, ev)

        t.send("madvise", 2 * P, 2 * P, Advice.DONTNEED)
        serve(t, handle)
        t.send("read", 0, N * P)
        got = serve(t, handle)
    assert events[0] == Remove(t.address + 2 * P, t.address + 4 * P)
    assert [type(e) for e in events[1:]] == [PageFault, PageFault]
    assert got == bytes(src[: 2 * P]) + bytes(2 * P) + bytes(src[4 * P:])


def test_fills_return_retry_while_a_remove_is_unread() -> None:
    src = pattern(N * P, seed=2)
    with Toucher.spawn(N * P, features=Feature.EVENT_REMOVE) as t:
        _prefill(t, src[:P])
        t.send("madvise", 0, P, Advice.DONTNEED)
        assert select.select([t.uffd], [], [], 5.0)[0], "no REMOVE event arrived"
        # The REMOVE is pending (not read): the kernel refuses every fill with EAGAIN.
        target = t.address + 5 * P
        assert t.uffd.copy(target, libc.buffer_address(src) + 5 * P, P) == Retry(0)
        assert t.uffd.zeropage(target, P) == Retry(0)
        assert t.uffd.read_events() == [Remove(t.address, t.address + P)]
        # Reading the event lets madvise finish; retry until the kernel agrees.
        deadline = time.monotonic() + 5.0
        while (res := t.uffd.copy(target, libc.buffer_address(src) + 5 * P, P)) != Filled(P):
            assert res == Retry(0) and time.monotonic() < deadline, res
        assert t.reply() is None  # madvise returned
        t.send("read", 5 * P, P)
        assert t.reply() == bytes(src[5 * P: 6 * P])


def test_munmap_sends_unmap_with_the_exact_range() -> None:
    events: list[Event] = []
    with Toucher.spawn(N * P, features=Feature.EVENT_UNMAP) as t:
        t.send("munmap", 2 * P, 3 * P)
        serve(t, lambda u, ev: events.append(ev))
    assert events == [Unmap(t.address + 2 * P, t.address + 5 * P)]


def test_mremap_sends_remap_and_faults_follow_the_new_address() -> None:
    src = pattern(N * P, seed=3)
    events: list[Event] = []
    with Toucher.spawn(N * P, features=Feature.EVENT_REMAP) as t:
        _prefill(t, src[:P])
        t.send("mremap")
        new = serve(t, lambda u, ev: events.append(ev))
        assert new == t.spare and events == [Remap(t.address, t.spare, N * P)]
        fill = copy_from(src, new)

        def handle(u: Userfaultfd, ev: Event) -> None:
            events.append(ev)
            fill(u, ev)

        t.send("read", 0, N * P)
        got = serve(t, handle)
    faults = [e.address for e in events if isinstance(e, PageFault)]
    # The first page moved with its contents; the others fault at the new address.
    assert sorted(faults) == [new + i * P for i in range(1, N)]
    assert got == bytes(src)


def test_fork_hands_over_a_uffd_that_serves_the_child_address_space() -> None:
    mine, theirs = pattern(2 * P, seed=4), pattern(2 * P, seed=5)
    seen: list[tuple[str, Event]] = []
    with Toucher.spawn(2 * P, features=Feature.EVENT_FORK) as t:
        _prefill(t, mine[:P])
        fill_mine, fill_theirs = copy_from(mine, t.address), copy_from(theirs, t.address)

        def handle(u: Userfaultfd, ev: Event) -> None:
            who = "parent" if u is t.uffd else "child"
            seen.append((who, ev))
            if isinstance(ev, PageFault):
                (fill_mine if who == "parent" else fill_theirs)(u, ev)

        t.send("fork_read", 0, 2 * P)
        kind, gpid, data = serve(t, handle)
        assert kind == "grandchild"
        assert serve(t, handle)[:2] == ("forked", gpid)
        t.send("read", P, P)
        parent_page = serve(t, handle)
    forks = [ev for _, ev in seen if isinstance(ev, Fork)]
    assert len(forks) == 1 and forks[0].uffd in t.extra
    assert forks[0].uffd.closed  # Toucher.close closed the adopted fd
    assert [(who, type(ev)) for who, ev in seen] == [
        ("parent", Fork), ("child", PageFault), ("parent", PageFault)]
    # Page 0 was inherited; page 1 came through each process's own uffd.
    assert data == bytes(mine[:P]) + bytes(theirs[P:])
    assert parent_page == bytes(mine[P:])


def test_one_read_returns_many_faults_with_thread_ids() -> None:
    src = pattern(N * P, seed=6)
    offsets = [1 * P, 3 * P, 4 * P, 6 * P]
    with Toucher.spawn(N * P, features=Feature.THREAD_ID) as t:
        t.send("threads_read", offsets, P)
        wait_for_fault_waiters(t.pid, len(offsets))
        tids = {int(x) for x in os.listdir(f"/proc/{t.pid}/task")}
        events = t.uffd.read_events()
        assert len(events) == len(offsets)
        fill = copy_from(src, t.address)
        for ev in events:
            fill(t.uffd, ev)
        got = t.reply()
    faults = [ev for ev in events if isinstance(ev, PageFault)]
    assert sorted(f.address for f in faults) == [t.address + o for o in offsets]
    assert len({f.thread_id for f in faults}) == len(offsets)
    assert {f.thread_id for f in faults} <= tids and t.pid not in {f.thread_id for f in faults}
    assert got == [bytes(src[o: o + P]) for o in offsets]


def test_exact_address_reports_the_unmasked_address() -> None:
    seen: list[PageFault] = []
    with Toucher.spawn(2 * P, features=Feature.EXACT_ADDRESS) as t:
        fill = copy_from(pattern(2 * P), t.address)

        def handle(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            seen.append(ev)
            fill(u, ev)

        t.send("read", P + 123, 1)
        serve(t, handle)
    assert [f.address for f in seen] == [t.address + P + 123]


def test_sigbus_feature_turns_faults_into_signals() -> None:
    with Toucher.spawn(P, features=Feature.SIGBUS) as t:
        t.send("read", 0, 1)
        with pytest.raises(ChildDied) as died:
            serve(t, lambda u, ev: pytest.fail(f"SIGBUS mode delivered {ev}"))
    assert died.value.signal == signal.SIGBUS
