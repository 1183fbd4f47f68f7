"""``pagein serve`` as a user runs it: clear errors before listening."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import start_server

pytestmark = pytest.mark.kernel


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagein", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_missing_memory_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mem"
    r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", str(missing))
    assert r.returncode == 1
    assert f"snapshot memory file {missing} does not exist" in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_socket_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    mem = tmp_path / "m.mem"
    mem.write_bytes(b"\1" * 8192)
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    r = _serve("--socket", str(taken), "--mem-file", str(mem))
    assert r.returncode == 2  # a flag to change, like argparse's errors
    assert f"--socket {taken} exists and is not a socket" in r.stderr
    assert taken.read_text() == "not a socket"


def test_bad_readahead_size_is_refused(tmp_path: Path) -> None:
    mem = tmp_path / "m.mem"
    mem.write_bytes(b"\1" * 8192)
    r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", str(mem),
               "--strategy", "readahead", "--readahead-size", "100K")
    assert r.returncode != 0
    assert "power of two" in r.stderr


def test_working_set_needs_a_file(tmp_path: Path) -> None:
    mem = tmp_path / "m.mem"
    mem.write_bytes(b"\1" * 8192)
    r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", str(mem),
               "--strategy", "working-set")
    assert r.returncode == 1
    assert "--working-set FILE" in r.stderr


def test_a_live_socket_is_not_stolen_but_a_stale_one_is_replaced(tmp_path: Path) -> None:
    mem = tmp_path / "m.mem"
    mem.write_bytes(b"\1" * 8192)
    path = tmp_path / "fc.sock"  # where start_server puts it
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        r = _serve("--socket", str(path), "--mem-file", str(mem))
        assert r.returncode == 2
        assert "is in use by another running handler" in r.stderr
    finally:
        live.close()  # the file stays behind: a stale socket, as after a crash
    server = start_server(str(tmp_path), str(mem))
    assert server.stop() == 0
