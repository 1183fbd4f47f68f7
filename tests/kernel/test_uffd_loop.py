"""Using a uffd from event loops: selectors with a stop fd, asyncio, blocking reads,
and a handler thread serving a GIL-free reader of its own process."""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import selectors
import threading

import pytest
from _toucher import Toucher, copy_from, pattern

from pagein._abi import libc
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import Filled, PageFault, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel
N = 16
P = PAGE_SIZE


def _serve_until_stopped(uffd: Userfaultfd, stop_fd: int, src: bytearray, base: int,
                         served: list[int]) -> None:
    """A handler loop: uffd plus a stop eventfd in one selector."""
    fill = copy_from(src, base)
    with selectors.DefaultSelector() as sel:
        sel.register(uffd, selectors.EVENT_READ)
        sel.register(stop_fd, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select(10.0):
                if key.fileobj == stop_fd:
                    return
                for ev in uffd.read_events():
                    fill(uffd, ev)
                    served.append(1)


def test_selector_loop_in_a_thread_with_a_stop_fd() -> None:
    src = pattern(N * P)
    served: list[int] = []
    stop = os.eventfd(0)
    with Toucher.spawn(N * P) as t:
        th = threading.Thread(target=_serve_until_stopped,
                              args=(t.uffd, stop, src, t.address, served))
        th.start()
        try:
            t.send("read", 0, N * P)
            got = t.reply()
        finally:
            os.eventfd_write(stop, 1)
            th.join(10.0)
            os.close(stop)
    assert not th.is_alive()
    assert got == bytes(src) and len(served) == N


def test_asyncio_add_reader_serves_while_awaiting_the_toucher() -> None:
    src = pattern(N * P, seed=2)

    async def main(t: Toucher) -> bytes:
        loop = asyncio.get_running_loop()
        fill = copy_from(src, t.address)

        def on_readable() -> None:
            for ev in t.uffd.read_events():
                fill(t.uffd, ev)

        loop.add_reader(t.uffd.fileno(), on_readable)
        try:
            t.sock.setblocking(False)
            t.send("read", 0, N * P)
            data = await asyncio.wait_for(loop.sock_recv(t.sock, 1 << 20), 10.0)
        finally:
            loop.remove_reader(t.uffd.fileno())
        kind, value = pickle.loads(data)
        assert kind == "ok"
        return bytes(value)

    with Toucher.spawn(N * P) as t:
        assert asyncio.run(main(t)) == bytes(src)


def test_read_events_async_waits_for_the_next_fault() -> None:
    src = pattern(2 * P, seed=3)

    async def main(t: Toucher) -> list[int]:
        t.send("read", 0, 2 * P)
        addresses = []
        for _ in range(2):
            events = await asyncio.wait_for(t.uffd.read_events_async(), 10.0)
            for ev in events:
                assert isinstance(ev, PageFault)
                addresses.append(ev.address)
                copy_from(src, t.address)(t.uffd, ev)
        return addresses

    with Toucher.spawn(2 * P) as t:
        assert asyncio.run(main(t)) == [t.address, t.address + P]
        assert t.reply() == bytes(src)


def test_blocking_uffd_reads_sleep_and_poll_reports_an_error() -> None:
    src = pattern(2 * P, seed=4)
    with Toucher.spawn(2 * P) as t:
        t.uffd.set_nonblocking(False)
        # The kernel answers poll on a blocking uffd with EPOLLERR: selectors can't use it.
        p = select.poll()
        p.register(t.uffd.fileno(), select.POLLIN)
        assert p.poll(0)[0][1] & select.POLLERR
        t.send("read", 0, 2 * P)
        fill = copy_from(src, t.address)
        for _ in range(2):
            (ev,) = t.uffd.read_events()  # sleeps in read() until the fault arrives
            fill(t.uffd, ev)
        assert t.reply() == bytes(src)
        with pytest.raises(ValueError, match="nonblocking"):
            asyncio.run(t.uffd.read_events_async())


def test_handler_thread_serves_a_gil_free_reader_of_its_own_process() -> None:
    # The reader faults inside memmove with the GIL released, so this thread can serve it.
    src = pattern(N * P, seed=5)
    with Mapping.anonymous(N * P) as m, Userfaultfd.open() as u:
        u.register(m.address, N * P, RegisterMode.MISSING)
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(m.read(0, N * P)))
        reader.start()
        served = 0
        try:
            while served < N:
                assert select.select([u], [], [], 10.0)[0], "no fault arrived"
                for ev in u.read_events():
                    assert isinstance(ev, PageFault)
                    off = ev.address - m.address
                    assert u.copy(ev.address, libc.buffer_address(src) + off, P) == Filled(P)
                    served += 1
        finally:
            u.close()
            reader.join(10.0)
        assert out == [bytes(src)]
