"""A peer cannot flood the server's log (issue 13, finding 7).

Whatever a VMM sends after its handshake, or however often it reconnects with a bad
one, the log grows by a bounded number of lines; the values it sent are escaped and cut.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import make_snapshot, start_server, wait_for
from vmm_peer import PAGE, connect

pytestmark = pytest.mark.kernel

SIZE = 1 << 20


def _log_size(path: str) -> int:
    return os.path.getsize(path)


def test_a_megabyte_of_newlines_after_the_handshake_is_a_few_lines(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    data = make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap)
    peer = connect(server.socket_path, 16 * PAGE)
    try:
        assert peer.read(0) == data[:PAGE]
        before = _log_size(server.log_path)
        peer.sock.sendall(b"\n" * (1 << 20))  # one megabyte at once
        for _ in range(2000):  # and many small pieces, each its own read
            peer.sock.send(b"\x1b[2J\r\n")
        peer.sock.sendall(b"A" * 100_000 + b"\n")  # one very long line
        # The session answers after reading all of it: still serving, in order.
        assert peer.stats()["faults"] == 1
        assert peer.read(5) == data[5 * PAGE:6 * PAGE]
        grown = _log_size(server.log_path) - before
        lines = [ln for ln in server.log().splitlines() if "unexpected bytes" in ln]
        assert 1 <= len(lines) <= 5, len(lines)
        assert grown < 4096, grown
        assert "\x1b" not in server.log()
        peer.close()
        wait_for(lambda: "similar line(s) suppressed" in server.log(), 20,
                 "the suppressed count when the session ends")
        assert f"vm pid={os.getpid()}: " in next(ln for ln in server.log().splitlines()
                                              if "similar line(s) suppressed" in ln)
    finally:
        peer.close()
        server.stop()


def test_bad_handshakes_in_a_loop_are_a_few_lines(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap, "--on-bad-handshake", "close")
    try:
        for _ in range(200):  # the same peer (this process) again and again
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(server.socket_path)
                s.sendall(b'["\x1b[31m' + b"x" * 10_000 + b'"]')
                s.settimeout(20)
                assert s.recv(1) == b""  # closed by the server
        lines = [ln for ln in server.log().splitlines() if "bad handshake" in ln]
        assert 1 <= len(lines) <= 5, len(lines)
        assert all(len(ln) < 400 for ln in lines)
        assert "\x1b" not in server.log()
        assert _log_size(server.log_path) < 8192
        assert server.proc.poll() is None
    finally:
        server.stop()
