"""Many VMs on one server; VMs and servers dying mid-restore."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    ServerProc,
    blocked_in_userfault,
    client,
    finish,
    make_snapshot,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

SIZE = 4 << 20


@pytest.fixture
def snap(tmp_path: Path) -> str:
    path = str(tmp_path / "mem.snap")
    make_snapshot(path, SIZE)
    return path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str] | ServerProc]]:
    items: list[subprocess.Popen[str] | ServerProc] = []
    yield items
    for p in items:
        if isinstance(p, ServerProc):
            p.stop()
        elif p.poll() is None:
            p.kill()
            p.wait()


def _readline(p: subprocess.Popen[str], timeout: float = 20) -> str:
    assert p.stdout is not None
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise AssertionError("client printed nothing in time")
    return p.stdout.readline()


def _wait_paused(p: subprocess.Popen[str]) -> list[str]:
    lines = []
    while True:
        line = _readline(p)
        if not line:
            raise AssertionError(f"client ended early: {p.wait()}")
        lines.append(line)
        if line.startswith("paused"):
            return lines


def test_twenty_concurrent_clients(tmp_path: Path, snap: str,
                                   procs: list[subprocess.Popen[str] | ServerProc]) -> None:
    server = start_server(str(tmp_path), snap, "--strategy", "readahead")
    procs.append(server)
    clients = []
    for i in range(20):
        off = (i % 8) * (512 << 10)
        c = client(*touch_args(server, snap, [(off, 512 << 10)], "--threads", "2",
                               "--seed", str(i)))
        procs.append(c)
        clients.append(c)
    for c in clients:
        rc, res = finish(c, timeout=90)
        assert rc == 0, res
    server.stop()
    doc = server.stats()
    vms = doc["vms"]
    assert isinstance(vms, list) and len(vms) == 20
    assert {v["peer_pid"] for v in vms} == {c.pid for c in clients}
    assert all(v["pages"] == 128 for v in vms)  # each VM got each of its pages once


def test_server_killed_mid_restore_client_blocks_never_reads_zeros(
        tmp_path: Path, snap: str, procs: list[subprocess.Popen[str] | ServerProc]) -> None:
    server = start_server(str(tmp_path), snap)
    procs.append(server)
    c = client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1", "--pause-after", "50"),
               stdin=subprocess.PIPE)
    procs.append(c)
    seen = _wait_paused(c)
    server.proc.kill()
    server.proc.wait()
    assert c.stdin is not None
    c.stdin.write("go\n")
    c.stdin.flush()
    # The next page nobody serves: the client's thread must sleep in the fault, because
    # the client still holds its own uffd. It must not get zeros, nor finish.
    wait_for(lambda: blocked_in_userfault(c.pid), 20, "the client to block in a fault")
    assert c.poll() is None
    assert not [ln for ln in seen if ln.startswith("mismatch")]
    c.kill()
    out, _ = c.communicate(timeout=10)
    assert "mismatch" not in out and '"ok"' not in out


def test_vm_killed_mid_restore_ends_only_its_session(
        tmp_path: Path, snap: str, procs: list[subprocess.Popen[str] | ServerProc]) -> None:
    server = start_server(str(tmp_path), snap, "--strategy", "populate-all",
                          "--chunk-size", "64K")
    procs.append(server)
    held = client(*touch_args(server, snap, [(0, 1 << 20)], "--hold"), stdin=subprocess.PIPE)
    procs.append(held)
    assert '"ok": true' in _readline(held)
    victim = client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1",
                                "--pause-after", "10"), stdin=subprocess.PIPE)
    procs.append(victim)
    _wait_paused(victim)
    victim.kill()
    victim.wait()
    rc, res = finish(client(*touch_args(server, snap, [(1 << 20, 1 << 20)])))
    assert rc == 0, res
    assert held.stdin is not None
    held.stdin.close()
    assert held.wait(timeout=20) == 0
    assert server.proc.poll() is None
    server.stop()
    vms = server.stats()["vms"]
    assert isinstance(vms, list)
    states = {v["peer_pid"]: v["state"] for v in vms}
    assert len(states) == 3 and {held.pid, victim.pid} <= set(states)
    assert set(states.values()) == {"peer exited"}
    assert f"vm pid={victim.pid}: session ended" in server.log()
    assert os.path.exists(server.stats_path)
