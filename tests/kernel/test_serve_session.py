"""Session ordering rules on the Python engine with a scripted uffd: EAGAIN defers, REMOVE
wins, EEXIST wakes. (The native core keeps the same rules: tests/kernel/test_core_native.py
checks them on a real uffd.)"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from pagein.serve.engine import EngineName
from pagein.serve.firecracker import Region
from pagein.serve.session import Session, SessionEnd
from pagein.serve.state import VmState
from pagein.serve.strategies import OnDemand
from pagein.snapshot.raw import RawFileSource
from pagein.sys.uffd import (
    AlreadyPresent,
    ApiInfo,
    Event,
    Feature,
    Filled,
    FillResult,
    PageFault,
    Remove,
    Retry,
)

pytestmark = pytest.mark.kernel

BASE = 0x7F0000000000
P = 4096


class ScriptedUffd:
    """Stands in for a uffd: events come in scripted batches, fills return scripted results.

    Readiness is a pipe with one byte per pending batch; ``then`` hooks push the next
    batch or stop the session when a given call happens.
    """

    def __init__(self, stop_w: int) -> None:
        self.r, self.w = os.pipe()
        self.batches: list[list[Event]] = []
        self.calls: list[tuple[str, int, int]] = []
        self.results: dict[str, list[FillResult]] = {"copy": [], "zeropage": []}
        self.stop_w = stop_w
        self.stop_after = 0

    def push(self, batch: list[Event]) -> None:
        self.batches.append(batch)
        os.write(self.w, b"x")

    def fileno(self) -> int:
        return self.r

    api = ApiInfo(Feature.NONE, frozenset())

    def readinto(self, buf: memoryview) -> int:
        """The batch as raw uffd_msg records (the session's engine reads into its journal)."""
        batch = self.read_events()
        for i, ev in enumerate(batch):
            if isinstance(ev, PageFault):
                rec = struct.pack("=B7xQQI4x", 0x12, 0x1 if ev.write else 0, ev.address,
                                  ev.thread_id)
            else:
                assert isinstance(ev, Remove)
                rec = struct.pack("=B7xQQ8x", 0x15, ev.start, ev.end)
            buf[i * 32:(i + 1) * 32] = rec
        return len(batch)

    def read_events(self, max_events: int = 64) -> list[Event]:
        os.read(self.r, 1)
        return self.batches.pop(0)

    def _fill(self, op: str, dst: int, length: int) -> FillResult:
        self.calls.append((op, dst, length))
        res = self.results[op].pop(0) if self.results[op] else Filled(length)
        if isinstance(res, Retry):
            # The event that made the kernel refuse arrives now.
            self.push([Remove(BASE, BASE + 2 * P)])
        self._maybe_stop()
        return res

    def _maybe_stop(self) -> None:
        if len(self.calls) >= self.stop_after:
            os.write(self.stop_w, b"x")

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> FillResult:
        return self._fill("copy", dst, length)

    def zeropage(self, start: int, length: int, mode: int = 0) -> FillResult:
        return self._fill("zeropage", start, length)

    def wake(self, start: int, length: int) -> None:
        self.calls.append(("wake", start, length))
        self._maybe_stop()

    def close(self) -> None:
        for fd in (self.r, self.w):
            os.close(fd)


def _run(s: Session, timeout: float = 10) -> SessionEnd | None:
    """Run the session in a thread; stop it (and fail) if it has not ended in time."""
    out: list[SessionEnd] = []
    t = threading.Thread(target=lambda: out.append(s.run()))
    t.start()
    t.join(timeout)
    if t.is_alive():
        os.write(s.uffd.stop_w, b"x")  # type: ignore[attr-defined]
        t.join()
        pytest.fail(f"the session did not end; calls so far: {s.uffd.calls}")  # type: ignore[attr-defined]
    s.close()
    s.uffd.close()
    s._final = s.state.counters.snapshot()  # type: ignore[attr-defined]
    s.state.close()
    s.source.close()
    s._test_peer.close()  # type: ignore[attr-defined]
    os.close(s.uffd.stop_w)  # type: ignore[attr-defined]
    os.close(s._stop_fd)
    return out[0]


def _session(tmp_path: Path) -> tuple[Session, ScriptedUffd, int]:
    path = tmp_path / "mem.snap"
    path.write_bytes(b"\x5a" * (16 * P))
    stop_r, stop_w = os.pipe()
    uffd = ScriptedUffd(stop_w)
    a, peer = socket.socketpair()
    regions = [Region(BASE, 16 * P, 0)]
    s = Session(uffd=uffd, sock=a, regions=regions,  # type: ignore[arg-type]
                source=RawFileSource(path), strategy=OnDemand(), state=VmState.create(regions),
                name="vm test", stop_fd=stop_r, engine=EngineName.PYTHON)
    s._test_peer = peer  # type: ignore[attr-defined]
    return s, uffd, stop_r


def test_eagain_defers_and_a_remove_read_meanwhile_turns_the_fill_into_zeros(
        tmp_path: Path) -> None:
    s, uffd, _ = _session(tmp_path)
    uffd.results["copy"] = [Retry(0)]
    uffd.stop_after = 2
    uffd.push([PageFault(BASE + P, False, False, False, 0)])
    assert _run(s) is SessionEnd.STOPPED
    # First the snapshot copy (refused), then, after the REMOVE was read, zeros.
    assert uffd.calls == [("copy", BASE + P, P), ("zeropage", BASE + P, P)]
    c = s._final  # type: ignore[attr-defined]
    assert c.retries == 1 and c.zero_pages == 1 and c.faults == 1
    assert c.removes == 1


def test_eexist_wakes_the_waiters_and_counts_no_page(tmp_path: Path) -> None:
    s, uffd, _ = _session(tmp_path)
    uffd.results["copy"] = [AlreadyPresent(0)]
    uffd.stop_after = 2
    uffd.push([PageFault(BASE + 3 * P, True, False, False, 0)])
    assert _run(s) is SessionEnd.STOPPED
    assert uffd.calls == [("copy", BASE + 3 * P, P), ("wake", BASE + 3 * P, P)]
    c = s._final  # type: ignore[attr-defined]
    assert c.eexist == 1 and c.pages == 0


def test_remove_in_the_same_read_as_the_fault_wins(tmp_path: Path) -> None:
    s, uffd, _ = _session(tmp_path)
    uffd.stop_after = 1
    uffd.push([PageFault(BASE, False, False, False, 0), Remove(BASE, BASE + P)])
    assert _run(s) is SessionEnd.STOPPED
    assert uffd.calls == [("zeropage", BASE, P)]


def test_peer_closing_its_socket_ends_the_session(tmp_path: Path) -> None:
    s, uffd, _ = _session(tmp_path)
    s._test_peer.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
    assert _run(s) is SessionEnd.PEER_EXITED
    assert uffd.calls == []
