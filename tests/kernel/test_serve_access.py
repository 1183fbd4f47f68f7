"""Who may connect (issue 13, findings 1-3), with real unprivileged peers: a hostile
reader running as ``nobody``, a fake handler run by ``nobody``, and a peer whose PID is
recycled before its bad handshake is judged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagein.errors import UntrustedHandler
from pagein.serve.firecracker import Region, connect_and_send
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd
from serve_harness import ServerProc, make_snapshot, start_server, wait_for

pytestmark = pytest.mark.kernel

NOBODY = 65534
PEER = str(Path(__file__).resolve().parent / "_nobody.py")
SIZE = 16 * PAGE_SIZE
WAIT_S = 30


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's own tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="pagein-access-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def root_only_snapshot(shared_dir: Path) -> tuple[str, bytes]:
    """A 0600 snapshot of root's: what the hostile reader is after."""
    path = str(shared_dir / "secret.mem")
    data = make_snapshot(path, SIZE, hole_every=0)
    os.chmod(path, 0o600)
    return path, data


def _peer(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, PEER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=WAIT_S * 2)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (proc.returncode, out, err[-2000:])
    doc: dict[str, object] = json.loads(lines[-1])
    return doc


def _read(server: ServerProc, mem: str, *extra: str) -> dict[str, object]:
    """Run the hostile reader as nobody against ``server``; its report."""
    return _result(_peer("reader", "--socket", server.socket_path, "--size", str(SIZE),
                         *extra))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serve(shared_dir: Path, mem: str, *extra: str) -> ServerProc:
    # umask 000: what an operator sets so that a jailed VMM's uid can reach the socket
    return start_server(str(shared_dir), mem, "--workers", "0", *extra, umask=0)


def test_socket_is_0600_under_umask_000_and_nobody_cannot_connect(
        shared_dir: Path, root_only_snapshot: tuple[str, bytes]) -> None:
    mem, _ = root_only_snapshot
    server = _serve(shared_dir, mem)
    try:
        st = os.stat(server.socket_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        got = _read(server, mem)
        assert got == {"connected": False, "error": os.strerror(13)}  # EACCES
        assert server.proc.poll() is None
        assert sorted(os.listdir(shared_dir)) == ["fc.sock", "secret.mem", "server.log"]
    finally:
        server.stop()


def test_a_peer_outside_the_allow_list_is_refused_unread_and_gets_no_page(
        shared_dir: Path, root_only_snapshot: tuple[str, bytes]) -> None:
    mem, _ = root_only_snapshot
    port = _free_port()
    server = _serve(shared_dir, mem, "--socket-mode", "0666", "--metrics-port", str(port))
    try:
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o666
        got = _read(server, mem, "--wait", "5", "--repeat", "19")
        # Connected (the mode let it), closed by the server, its uffd never filled.
        assert got["connected"] is True and got["closed"] is True, got
        assert got["touched"] is False and got["pages_present"] == 0, got
        assert got["refused_again"] == 19
        assert server.proc.poll() is None  # the server goes on
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert "\npagein_refused_peers_total 20.0\n" in resp.read().decode()
    finally:
        server.stop()
    log = server.log()
    refusals = [ln for ln in log.splitlines() if "refused a connection from" in ln]
    assert 1 <= len(refusals) <= 5, log[-3000:]  # 20 refusals, a bounded number of lines
    assert f"uid={NOBODY} gid={NOBODY}" in refusals[0] and "--allow-uid" in refusals[0]
    assert "bad handshake" not in log and "killing" not in log
    stats = server.stats()
    assert stats["refused_peers"] == 20
    assert stats["handshake_failures"] == 0 and stats["vms"] == []


def test_allow_uid_serves_that_peer(shared_dir: Path,
                                    root_only_snapshot: tuple[str, bytes]) -> None:
    """The same reader is served once its uid is allowed: the refusal above was the
    allow-list and nothing else."""
    mem, data = root_only_snapshot
    server = _serve(shared_dir, mem, "--socket-mode", "0666", "--allow-uid", f"0,{NOBODY}")
    try:
        got = _read(server, mem)
    finally:
        server.stop()
    assert got["touched"] is True and got["closed"] is False, (got, server.log()[-3000:])
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert server.stats()["refused_peers"] == 0


def test_socket_group_sets_the_gid_and_serves_that_group(
        shared_dir: Path, root_only_snapshot: tuple[str, bytes]) -> None:
    mem, data = root_only_snapshot
    server = _serve(shared_dir, mem, "--socket-group", "nogroup")
    try:
        st = os.stat(server.socket_path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o660)
        got = _read(server, mem)  # nobody's gid is nogroup: connects and is served
    finally:
        server.stop()
    assert got["touched"] is True and got["sha256"] == hashlib.sha256(data).hexdigest(), got
    server = _serve(shared_dir, mem, "--socket-group", str(NOBODY), "--socket-mode", "640")
    try:
        st = os.stat(server.socket_path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o640)
    finally:
        server.stop()


# --- the restore client checks who serves the socket -------------------------------------


@pytest.fixture
def fake_handler(shared_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A listener run by nobody, in a directory nobody may write."""
    d = shared_dir / "nobody"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    path = str(d / "handler.sock")
    proc = _peer("listen", "--socket", path)
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline()) == {
            "listening": True}
        yield path, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _send_to(path: str, **kw: object) -> None:
    with Userfaultfd.open(Feature.EVENT_REMOVE) as uffd, Mapping.anonymous(SIZE) as m:
        uffd.register(m.address, SIZE, RegisterMode.MISSING)
        connect_and_send(path, [Region(m.address, SIZE, 0)], uffd, **kw).close()  # type: ignore[arg-type]


def test_restore_client_refuses_a_handler_run_by_another_uid(
        fake_handler: tuple[str, subprocess.Popen[str]]) -> None:
    path, listener = fake_handler
    with pytest.raises(UntrustedHandler) as err:
        _send_to(path)
    assert f"runs as uid {NOBODY}," in str(err.value) and f"--trust-uid {NOBODY}" in str(err.value)
    assert err.value.uid == NOBODY
    assert _result(listener) == {"accepted": True, "bytes": 0, "fds": 0}  # nothing sent


def test_restore_client_sends_to_a_trusted_uid(
        fake_handler: tuple[str, subprocess.Popen[str]]) -> None:
    path, listener = fake_handler
    _send_to(path, trust_uids=(NOBODY,))
    got = _result(listener)
    assert got["fds"] == 1 and isinstance(got["bytes"], int) and got["bytes"] > 0


# --- a bad handshake from a peer whose PID was recycled ----------------------------------


def _has_pidfd_of(server_pid: int, pid: int) -> bool:
    """Whether the server holds a pidfd of ``pid`` (fdinfo names the process)."""
    fd_dir = f"/proc/{server_pid}/fdinfo"
    for fd in os.listdir(fd_dir):
        try:
            with open(f"{fd_dir}/{fd}") as f:
                if f"\nPid:\t{pid}\n" in f.read():
                    return True
        except OSError:
            continue
    return False


def _recycle(pid: int, tries: int = 2000) -> subprocess.Popen[bytes]:
    """Start an unrelated root process that gets ``pid`` (``ns_last_pid``; other
    processes on the machine may take it first, so loop)."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "600"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"could not recycle pid {pid} in {tries} tries")


def test_a_bad_handshake_never_kills_a_process_that_reused_the_peer_pid(
        shared_dir: Path, root_only_snapshot: tuple[str, bytes]) -> None:
    mem, _ = root_only_snapshot
    server = _serve(shared_dir, mem, "--socket-mode", "0666", "--allow-uid", str(NOBODY),
                    "--on-bad-handshake", "kill", "--handshake-timeout", "120")
    exit_r, exit_w = os.pipe()
    go_r, go_w = os.pipe()
    peer = _peer("pidreuse", "--socket", server.socket_path, "--exit-fd", str(exit_r),
                 "--go-fd", str(go_r), pass_fds=(exit_r, go_r))
    os.close(exit_r)
    os.close(go_r)
    victim: subprocess.Popen[bytes] | None = None
    try:
        assert peer.stdout is not None
        pid = json.loads(peer.stdout.readline())["pid"]
        assert pid == peer.pid
        wait_for(lambda: _has_pidfd_of(server.proc.pid, pid), WAIT_S, "the server's pidfd")
        os.close(exit_w)  # the process that connected exits; its child keeps the socket
        assert peer.wait(WAIT_S) == 0
        victim = _recycle(pid)
        os.close(go_w)  # now the child sends its bad handshake
        assert json.loads(peer.stdout.readline()) == {"sent": True}
        assert json.loads(peer.stdout.readline()) == {"closed": True}
        assert victim.poll() is None, "the server killed the process that reused the PID"
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
        server.stop()
        peer.communicate(timeout=WAIT_S)
    log = server.log()
    assert f"vm pid={pid}: bad handshake field payload=" in log
    assert f"pid {pid}: the VMM had already exited; nothing killed" in log
