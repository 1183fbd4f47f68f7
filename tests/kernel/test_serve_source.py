"""RawFileSource: zero-copy addresses, holes from SEEK_DATA/SEEK_HOLE, clear errors."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import pytest

from pagein.errors import SnapshotFormatError, SourceError
from pagein.serve.options import ServeOptions
from pagein.serve.served import Served
from pagein.serve.server import Server
from pagein.serve.strategies import StrategyName
from pagein.snapshot.open import open_source
from pagein.snapshot.raw import RawFileSource
from pagein.snapshot.source import PageSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import blocked_in_userfault, client, finish, wait_for

pytestmark = pytest.mark.kernel

P = 4096


def _sparse(path: Path, data_pages: list[int], pages: int) -> bytes:
    content = bytearray(pages * P)
    with open(path, "wb") as f:
        f.truncate(pages * P)
        for i in data_pages:
            block = bytes([i % 251 + 1]) * P
            content[i * P:(i + 1) * P] = block
            f.seek(i * P)
            f.write(block)
    return bytes(content)


def test_holes_are_reported_and_data_is_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    data = _sparse(path, [0, 1, 5, 9, 10, 11, 63], 64)
    with open_source(str(path)) as src:
        assert isinstance(src, RawFileSource) and src.size == 64 * P
        assert src.zero_extents(0, 64 * P) == [(2 * P, 3 * P), (6 * P, 3 * P), (12 * P, 51 * P)]
        assert src.zero_extents(P, 2 * P) == [(2 * P, P)]
        assert src.zero_extents(9 * P, 3 * P) == []
        addr = src.address_of(9 * P, 3 * P)
        assert addr is not None
        assert ctypes.string_at(addr, 3 * P) == data[9 * P:12 * P]
        buf = bytearray(5 * P)
        src.read_into(8 * P, memoryview(buf))
        assert bytes(buf) == data[8 * P:13 * P]
        with pytest.raises(SourceError, match="outside snapshot memory file"):
            src.read_into(63 * P, memoryview(bytearray(2 * P)))


def test_every_hole_is_zero_and_every_extent_reported(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    pages = [i for i in range(200) if (i * 7) % 5 == 0]
    data = _sparse(path, pages, 200)
    with RawFileSource(path) as src:
        holes = src.zero_extents(0, 200 * P)
        for off, n in holes:
            assert not any(data[off:off + n])
        hole_pages = {p for off, n in holes for p in range(off // P, (off + n) // P)}
        assert hole_pages == set(range(200)) - set(pages)


@pytest.mark.parametrize(("make", "error", "words"), [
    (lambda p: None, SourceError, "does not exist"),
    (lambda p: p.mkdir(), SourceError, "is a directory"),
    (lambda p: p.write_bytes(b""), SnapshotFormatError, "is empty"),
])
def test_clear_errors(tmp_path: Path, make: object, error: type[Exception], words: str) -> None:
    path = tmp_path / "mem.snap"
    make(path)  # type: ignore[operator]
    with pytest.raises(error) as e:
        RawFileSource(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_close_is_idempotent_and_fd_released(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    _sparse(path, [0], 4)
    before = len(os.listdir("/proc/self/fd"))
    src = RawFileSource(path)
    src.close()
    src.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(SourceError, match="closed"):
        src.read_into(0, memoryview(bytearray(P)))


class BytesSource(PageSource):
    """A source with no address to copy from (as a store is): served via read_into."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data = data
        self.reads = 0
        self.fail_after = fail_after

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise SourceError(f"chunk at 0x{offset:x} is unavailable (test)")
        buf[:] = self.data[offset:offset + len(buf)]


def _serve_in_thread(tmp_path: Path, source: PageSource,
                     strategy: str) -> tuple[Server, threading.Thread]:
    opts = ServeOptions(str(tmp_path / "s.sock"), "test-source", exit_after=1, workers=0,
                        strategy=StrategyName(strategy))
    server = Server(Served.of(source, opts))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return server, t


@pytest.mark.parametrize("strategy", ["on-demand", "populate-all"])
def test_source_without_address_is_served_through_a_buffer(tmp_path: Path,
                                                           strategy: str) -> None:
    path = tmp_path / "mem.snap"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    source = BytesSource(data)
    server, t = _serve_in_thread(tmp_path, source, strategy)
    try:
        c = client("touch", "--socket", str(tmp_path / "s.sock"), "--mem-file", str(path),
                   "--regions", "0x10000:0x80000,0x90000:0x40000", "--threads", "2")
        rc, res = finish(c)
        assert rc == 0, res
        t.join(timeout=30)
        assert not t.is_alive()
        assert server.totals().bytes_copied == 0xC0000 and source.reads > 0
    finally:
        server.stop()
        t.join(timeout=30)


def test_failing_source_freezes_the_vm_loudly_never_zeros(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mem.snap"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    server, t = _serve_in_thread(tmp_path, BytesSource(data, fail_after=20), "on-demand")
    c = client("touch", "--socket", str(tmp_path / "s.sock"), "--mem-file", str(path),
               "--regions", "0:0x100000", "--threads", "1")
    try:
        wait_for(lambda: any("is unavailable (test)" in r.getMessage()
                             and r.levelname == "ERROR" for r in caplog.records),
                 20, "the session to log the source failure")
        wait_for(lambda: blocked_in_userfault(c.pid), 20, "the client to block in a fault")
        assert c.poll() is None  # frozen on the page that could not be read, not zero-filled
    finally:
        c.kill()
        out, _ = c.communicate(timeout=10)
        server.stop()
        t.join(timeout=30)
    assert "mismatch" not in out
