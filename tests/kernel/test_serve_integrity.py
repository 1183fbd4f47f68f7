"""Data integrity under a hostile environment: an empty hugetlb pool (the kernel says
EEXIST for a page it never installed) and a memory file changed while it is served.
Every test runs on both fault engines (PAGEIN_ENGINE=python runs it again)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagein.sys.process import live_children_named

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    ServerProc,
    blocked_in_userfault,
    client,
    empty_hugetlb_pool,
    make_snapshot,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

HUGE = 2 << 20
_clients: list[subprocess.Popen[str]] = []


@pytest.fixture
def servers() -> Iterator[list[ServerProc]]:
    """Servers to stop after the test, and every client it started killed (a failed
    assertion must not leave one blocked on a fault forever)."""
    started: list[ServerProc] = []
    yield started
    for c in _clients:
        if c.poll() is None:
            c.kill()
            c.communicate()
    _clients.clear()
    for s in started:
        s.stop()


def _vm_row(server: ServerProc) -> dict[str, object]:
    vms = server.stats()["vms"]
    assert isinstance(vms, list) and len(vms) == 1, vms
    row: dict[str, object] = vms[0]
    return row


@pytest.mark.hugetlb
@pytest.mark.parametrize("workers", ["1", "0"])
def test_empty_hugetlb_pool_fails_the_vm_loudly_instead_of_spinning(
        tmp_path: Path, servers: list[ServerProc], workers: str) -> None:
    path = str(tmp_path / "mem.snap")
    make_snapshot(path, 4 * HUGE, hole_every=0)
    server = start_server(str(tmp_path), path, "--workers", workers)
    servers.append(server)
    with empty_hugetlb_pool():
        c = client(*touch_args(server, path, [(0, 4 * HUGE)], "--hugetlb", "--threads", "2"))
        _clients.append(c)
        try:
            wait_for(lambda: "has no page there" in server.log(), 20, "the pool error in the log")
            # Served no more: the vCPUs sleep on their faults, nobody wakes them to spin.
            wait_for(lambda: blocked_in_userfault(c.pid), 10, "the client to block")
        finally:
            c.send_signal(signal.SIGKILL)
            c.wait()
    server.stop()
    log = server.log()
    errors = [ln for ln in log.splitlines() if "nr_hugepages" in ln and "ERROR" in ln]
    assert len(errors) == 1, log
    assert "2048 KiB" in errors[0] and "hugepages-2048kB/nr_hugepages" in errors[0]
    assert "has no page there" in errors[0]
    # The handshake already warned that the pool could not hold the VM.
    assert "need 4 pages but the pool can give 0" in log
    row = _vm_row(server)
    assert row["state"] == "failed"
    assert row["pages"] == 0
    assert isinstance(row["faults"], int) and row["faults"] <= 4  # no livelock
    assert isinstance(row["eexist"], int) and row["eexist"] <= 4


# --- the memory file changed while served ----------------------------------------------

SIZE = 4 << 20  # 1024 pages, all data
PAUSE = 64  # pages the client reads before the test changes the file


def _paused_client(server: ServerProc, path: str) -> subprocess.Popen[str]:
    c = client(*touch_args(server, path, [(0, SIZE)], "--threads", "1", "--pause-after",
                           str(PAUSE)), stdin=subprocess.PIPE)
    _clients.append(c)
    assert c.stdout is not None
    for line in c.stdout:
        if line.strip() == "paused":
            return c
        assert not line.startswith("mismatch"), line
    raise AssertionError(f"the client never paused: {c.communicate()[1][-2000:]}")


def _resume_until_frozen(c: subprocess.Popen[str]) -> str:
    """Let the client go on; once it blocks on a fault nobody serves, kill it and return
    what it printed after the pause."""
    assert c.stdin is not None and c.stdout is not None
    c.stdin.write("\n")
    c.stdin.flush()

    def frozen() -> bool:
        # Every fault blocks in userfaultfd until served: only a block that lasts is a
        # fault the server refuses (a served one takes microseconds).
        for _ in range(4):
            if c.poll() is not None:
                return True
            if not blocked_in_userfault(c.pid):
                return False
            time.sleep(0.25)
        return True

    try:
        wait_for(frozen, 20, "the client to block on a fault the server refuses")
        assert c.poll() is None, "the client finished: changed data was served"
    finally:
        c.kill()
    out, _ = c.communicate()
    return out


def _changed(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


@pytest.mark.parametrize("workers", ["1", "0"])
def test_a_memory_file_written_while_served_is_refused_never_served(
        tmp_path: Path, servers: list[ServerProc], workers: str) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, SIZE, hole_every=0)
    server = start_server(str(tmp_path), path, "--workers", workers)
    servers.append(server)
    c = _paused_client(server, path)
    written = threading.Event()

    def writer() -> None:
        # The read lease holds this open() until the server has stopped serving the file.
        with open(path, "r+b") as f:
            f.write(_changed(data))
        written.set()

    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: "changed while it was served" in server.log(), 20, "the change logged")
    t.join(30)
    assert written.is_set(), "the writer is still held by the lease"
    out = _resume_until_frozen(c)
    assert "mismatch" not in out, out  # not one byte that differs from the snapshot
    server.stop()
    log = server.log()
    assert f"snapshot memory file {path} changed while it was served (a process opened it " \
           "for writing): refusing to serve it" in log, log
    assert "must not be written while VMs are restored from it" in log
    assert "no read lease" not in log  # the lease was taken: the write was prevented
    stopped = [ln for ln in log.splitlines() if "serving stopped" in ln]
    assert len(stopped) == 1 and "changed while it was served" in stopped[0], log
    assert _vm_row(server)["state"] == "failed"


def test_without_a_lease_a_write_is_noticed_and_refused(
        tmp_path: Path, servers: list[ServerProc]) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, SIZE, hole_every=0)
    held = os.open(path, os.O_RDWR)  # open for writing: no read lease can be taken
    try:
        server = start_server(str(tmp_path), path, "--workers", "1")
        servers.append(server)
        c = _paused_client(server, path)
        os.pwrite(held, _changed(data[:SIZE // 2]), SIZE // 2)
        # Without a lease nothing holds the writer: each process notices within its next
        # check (a second). The worker serving the VM is the one that must have.
        wait_for(lambda: "[worker 0]: snapshot memory file" in server.log(), 20,
                 "the worker to notice the change")
        out = _resume_until_frozen(c)
    finally:
        os.close(held)
    assert "mismatch" not in out, out
    server.stop()
    log = server.log()
    assert f"no read lease on {path}: it is open for writing elsewhere" in log, log
    assert "(it was written (its modification time changed))" in log, log
    assert _vm_row(server)["state"] == "failed"


def test_a_memory_file_truncated_while_served_is_named_as_truncated(
        tmp_path: Path, servers: list[ServerProc]) -> None:
    path = str(tmp_path / "mem.snap")
    make_snapshot(path, SIZE, hole_every=0)
    held = os.open(path, os.O_RDWR)  # no lease: the fill may run into the cut mapping
    try:
        server = start_server(str(tmp_path), path, "--workers", "1")
        servers.append(server)
        c = _paused_client(server, path)
        os.ftruncate(held, PAUSE * 4096)
        out = _resume_until_frozen(c)  # at once: the next fill may see EFAULT first
    finally:
        os.close(held)
    assert "mismatch" not in out, out
    server.stop()
    log = server.log()
    stopped = [ln for ln in log.splitlines() if "serving stopped" in ln]
    assert len(stopped) == 1, log
    assert f"its size went from 0x{SIZE:x} to 0x{PAUSE * 4096:x} bytes (truncated)" in \
        stopped[0], log
    assert "Bad address" not in log and "not mapped in the right process" not in log


def test_a_worker_started_after_the_file_was_replaced_refuses_the_new_file(
        tmp_path: Path, servers: list[ServerProc]) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, SIZE, hole_every=0)
    server = start_server(str(tmp_path), path, "--workers", "1")
    servers.append(server)
    c = _paused_client(server, path)
    other = str(tmp_path / "other.snap")
    with open(other, "wb") as f:
        f.write(_changed(data))
    os.replace(other, path)  # harmless to the running worker: it keeps the file it opened
    # The spare worker opened the path before the replacement (it holds the original
    # file, and would serve the VM right): kill it first, so that the worker that takes
    # over is forked now and opens the path, the other file.
    wait_for(lambda: live_children_named(server.proc.pid, "pagein-spare"), 30, "the spare")
    for spare in live_children_named(server.proc.pid, "pagein-spare"):
        os.kill(spare, signal.SIGKILL)
    (worker,) = live_children_named(server.proc.pid, "pagein-worker")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: "handed to worker" in server.log(), 30, "the VM handed to a new worker")
    out = _resume_until_frozen(c)
    assert "mismatch" not in out, out
    server.stop()
    log = server.log()
    assert "it is another file than the one pagein serve opened (replaced since)" in log, log
    assert _vm_row(server)["state"] == "failed"


def test_a_read_lease_holds_an_unprivileged_writer_until_it_is_given_back() -> None:
    """The mechanism under the guard: an unprivileged writer's open() waits while the
    lease is held, the holder gets SIGIO and sees the break; giving it back lets the
    writer go on."""
    from pagein.snapshot.raw import RawFileSource

    d = tempfile.mkdtemp(prefix="pagein-lease-", dir="/tmp")
    os.chmod(d, 0o755)  # nobody must reach the file
    path = os.path.join(d, "mem.snap")
    with open(path, "wb") as f:
        f.write(b"\x01" * 8192)
    os.chmod(path, 0o666)
    signals: list[int] = []
    old = signal.signal(signal.SIGIO, lambda signum, frame: signals.append(signum))
    src = RawFileSource(path)
    r, w = os.pipe()
    try:
        assert src.take_lease() is None and src.leased
        assert src.changed() is None
        pid = os.fork()
        if pid == 0:  # the writer: nobody, opening the snapshot to change it
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                fd = os.open(path, os.O_WRONLY)
                os.write(w, b"opened")
                os.pwrite(fd, b"\x02" * 4096, 0)
                os._exit(0)
            except BaseException:
                os._exit(1)
        os.close(w)
        w = -1
        wait_for(lambda: src.changed() is not None, 20, "the lease break")
        assert src.changed() == "a process opened it for writing"
        assert signals == [signal.SIGIO]
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 16)  # the writer still waits in open(): nothing changed yet
        with open(path, "rb") as f:
            assert f.read() == b"\x01" * 8192
        src.release_lease()
        os.set_blocking(r, True)
        assert os.read(r, 16) == b"opened"
        assert os.waitpid(pid, 0)[1] == 0
        assert src.changed() == "a process opened it for writing"  # for good
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        src.close()
        signal.signal(signal.SIGIO, old)
        shutil.rmtree(d)
