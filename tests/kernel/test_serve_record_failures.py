"""``--record`` when the disk is full or a path is unwritable (issue 13, finding 8).

Before: the trace was written first and its failure raised, so the working set was
never written, only the trace failure was logged, and a 0-byte temporary file stayed.
Now each file is written on its own, each failure is one line naming its file, and no
temporary file survives a failure.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagein.serve.record import load_trace
from pagein.snapshot import workingset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import make_snapshot, start_server, wait_for
from vmm_peer import PAGE, connect

pytestmark = pytest.mark.kernel

SIZE = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _restore_and_go(socket_path: str, pages: int, data: bytes) -> None:
    """One VM that touches ``pages`` pages (bytes checked) and goes."""
    peer = connect(socket_path, pages * PAGE)
    try:
        for p in range(pages):
            assert peer.read(p) == data[p * PAGE:(p + 1) * PAGE], p
    finally:
        peer.close()


def _lines(log: str, what: str) -> list[str]:
    return [ln for ln in log.splitlines() if what in ln]


def test_a_full_disk_costs_each_file_one_line_and_leaves_no_temporary_file(
        tmp_path: Path, small_fs: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    data = make_snapshot(snap, SIZE, hole_every=0)
    ws = small_fs / "ws"
    server = start_server(str(tmp_path), snap, "--record", str(ws), "--workers", "1")
    try:
        # 1. A working set of 64 data pages (256 KiB) cannot fit; its trace (~2 KiB) can.
        _restore_and_go(server.socket_path, 64, data)
        wait_for(lambda: _lines(server.log(), "cannot write the working set"), 30,
                 "the working-set failure")
        wait_for(lambda: (small_fs / "ws.trace.json").exists(), 30, "the trace")
        line, = _lines(server.log(), "cannot write the working set")
        assert f"{ws}: No space left on device" in line
        assert len(load_trace(str(small_fs / "ws.trace.json")).faults) >= 1
        assert sorted(p.name for p in small_fs.iterdir()) == ["ws.trace.json"]
        # 2. The disk filled to the last byte: both files fail, each says so, none is left.
        with open(small_fs / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\xff" * PAGE)
            except OSError:
                pass
        _restore_and_go(server.socket_path, 4, data)
        wait_for(lambda: _lines(server.log(), "cannot write the trace"), 30,
                 "the trace failure")
        log = server.log()
        assert len(_lines(log, "cannot write the working set")) == 2
        assert f"{ws}.2: No space left on device" in _lines(log, "cannot write the working set")[1]
        line, = _lines(log, "cannot write the trace")
        assert f"{small_fs}/ws.trace.json.2: No space left on device" in line
        assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "ws.trace.json"]
        assert "Traceback" not in log and server.proc.poll() is None
    finally:
        server.stop()


def test_an_unwritable_trace_path_still_writes_the_working_set(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    data = make_snapshot(snap, SIZE, hole_every=0)
    (tmp_path / "not-a-dir").write_text("")
    trace = tmp_path / "not-a-dir" / "trace.json"
    ws = tmp_path / "ws"
    server = start_server(str(tmp_path), snap, "--record", str(ws), "--trace", str(trace))
    try:
        _restore_and_go(server.socket_path, 8, data)
        wait_for(lambda: _lines(server.log(), "cannot write the trace"), 30, "the trace failure")
        wait_for(lambda: ws.exists(), 30, "the working set")
        line, = _lines(server.log(), "cannot write the trace")
        assert f"{trace}: Not a directory" in line
        assert workingset.load_extents(str(ws)) == [(0, 8 * PAGE)]
        assert not list(tmp_path.glob("ws.tmp-*"))
        assert not _lines(server.log(), "cannot write the working set")
    finally:
        server.stop()
