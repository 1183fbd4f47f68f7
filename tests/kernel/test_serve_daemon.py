"""``pagein serve`` as a host daemon a service manager drives (issue 17).

Probes are never killed, start-up errors are one line naming the flag (exit 2), SIGTERM
drains, SIGHUP logs the state, sd_notify and socket activation by their own environment
variables, and one log format (text or JSON) from every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    client,
    finish,
    make_snapshot,
    serving_workers,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
PAGEIN = [sys.executable, "-m", "pagein"]


def _serve(*args: str, env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PAGEIN, "serve", *args], capture_output=True, text=True,
                          timeout=60, env=env, pass_fds=pass_fds)


def _snap(tmp: Path) -> tuple[str, bytes]:
    snap = str(tmp / "mem.snap")
    return snap, make_snapshot(snap, SIZE)


# --- who gets killed ---------------------------------------------------------------------

PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
if sys.argv[2] == "garbage":
    s.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n")
    s.recv(1)
s.close()
print("done", flush=True)
sys.stdin.read()  # stay alive until the test has looked
"""


@pytest.mark.parametrize("kind", ["connect-close", "garbage"])
def test_a_health_probe_is_closed_never_killed(tmp_path: Path, kind: str) -> None:
    """Before the fix a connection that sent nothing (or bytes without a uffd) was a bad
    handshake and the default policy SIGKILLed the prober."""
    snap, _ = _snap(tmp_path)
    server = start_server(str(tmp_path), snap, "--log-level", "debug",
                          "--handshake-timeout", "0.5")
    probe = subprocess.Popen([sys.executable, "-c", PROBE, server.socket_path, kind],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline() == "done\n"
        wait_for(lambda: f"vm pid={probe.pid}:" in server.log(), 20, "the server's line")
        assert probe.poll() is None, server.log()[-2000:]  # alive
        assert "killing" not in server.log()
        assert server.proc.poll() is None
    finally:
        probe.kill()
        probe.wait()
        assert server.stop() == 0


def test_a_second_server_on_a_busy_socket_exits_with_one_line_and_is_not_killed(
        tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    server = start_server(str(tmp_path), snap)
    try:
        r = _serve("--socket", server.socket_path, "--mem-file", snap)
        assert r.returncode == 2, (r.returncode, r.stderr)  # -9 before the fix
        assert r.stderr.strip().splitlines() == [
            f"pagein: error: --socket {server.socket_path} is in use by another running "
            "handler: stop it or choose another path"]
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)])))
        assert rc == 0 and res["ok"], res  # the first one serves on
    finally:
        assert server.stop() == 0


# --- start-up errors and invalid flags: one line naming the flag, exit 2 --------------------

def _one_line_error(r: subprocess.CompletedProcess[str], flag: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and flag in lines[-1], r.stderr
    assert len([ln for ln in lines if "error:" in ln]) == 1, r.stderr


BAD_FLAGS = [
    (["--readahead-size", "1M"], "--readahead-size"),  # on-demand has no window
    (["--strategy", "populate-all", "--readahead-size", "1M"], "--readahead-size"),
    (["--then", "on-demand"], "--then"),
    (["--strategy", "readahead", "--record", "ws"], "--record"),
    (["--handshake-timeout", "-1"], "--handshake-timeout"),
    (["--handshake-timeout", "nan"], "--handshake-timeout"),
    (["--exit-after", "-3"], "--exit-after"),
    (["--exit-after", "0"], "--exit-after"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--metrics-port", "99999"], "--metrics-port"),
    (["--workers", "-1"], "--workers"),
    (["--chunk-size", "0"], "--chunk-size"),
]


@pytest.mark.parametrize(("extra", "flag"), BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_an_invalid_flag_is_one_line_naming_it(tmp_path: Path, extra: list[str],
                                               flag: str) -> None:
    snap, _ = _snap(tmp_path)
    r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", snap, *extra)
    _one_line_error(r, flag)
    assert not (tmp_path / "s.sock").exists()


def test_stats_json_in_a_missing_directory_is_refused_at_start(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", snap,
               "--stats-json", "/no/such/dir/x")
    _one_line_error(r, "--stats-json /no/such/dir/x")
    assert "No such file or directory" in r.stderr


def test_a_metrics_port_in_use_is_refused_at_start(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve("--socket", str(tmp_path / "s.sock"), "--mem-file", snap,
                   "--metrics-port", str(port))
    _one_line_error(r, f"--metrics-port {port}")
    assert "Address already in use" in r.stderr


def test_vm_restore_refuses_uffd_flags_with_another_backend(tmp_path: Path) -> None:
    r = subprocess.run([*PAGEIN, "vm", "restore", str(tmp_path), "--backend", "file",
                        "--strategy", "readahead"], capture_output=True, text=True, timeout=60)
    _one_line_error(r, "--strategy only applies to --backend uffd")
    r = subprocess.run([*PAGEIN, "vm", "restore", str(tmp_path), "--backend", "copy",
                        "--no-collapse"], capture_output=True, text=True, timeout=60)
    _one_line_error(r, "--no-collapse only applies to --backend uffd")


# The interpreter lives where nobody cannot read: import as root, then drop privileges.
AS_NOBODY = """
import os, sys
import pagein.cli.main, pagein.cli.serve, pagein.serve.server, pagein.serve.served
import pagein.snapshot.open, pagein.snapshot.raw, pagein.sys.systemd
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(pagein.cli.main.main(sys.argv[1:]))
"""


def test_a_stale_socket_of_root_is_one_line_for_another_user() -> None:
    """As nobody, in a sticky world-writable directory holding root's stale socket: the
    rename over it would fail (EPERM); said at start, naming --socket."""
    d = tempfile.mkdtemp(prefix="pagein-stale-", dir="/tmp")
    try:
        os.chmod(d, 0o1777)
        path = os.path.join(d, "fc.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # left behind, as after a crash
        snap = os.path.join(d, "mem.snap")
        make_snapshot(snap, SIZE)
        os.chmod(snap, 0o644)
        r = subprocess.run([sys.executable, "-c", AS_NOBODY, "serve", "--socket", path,
                            "--mem-file", snap, "--workers", "0"], capture_output=True,
                           text=True, timeout=60, cwd=d)
        _one_line_error(r, f"--socket {path}")
        assert "owned by uid 0" in r.stderr
    finally:
        subprocess.run(["rm", "-rf", d], check=True)


# --- lifecycle -------------------------------------------------------------------------------

def test_sigterm_drains_a_live_vm_to_completion_and_exits_0(tmp_path: Path) -> None:
    """An on-demand VM whose guest is idle is filled by the drain itself: before the fix
    the server waited the whole --drain-timeout for a guest that touched nothing, then
    left it to freeze on its next missing page."""
    snap, _ = _snap(tmp_path)
    server = start_server(str(tmp_path), snap, "--drain-timeout", "600")
    c = client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1", "--pause-after", "8"),
               stdin=subprocess.PIPE)
    try:
        assert c.stdout is not None and c.stdout.readline().strip() == "paused"
        server.proc.send_signal(signal.SIGTERM)
        # The guest stays paused: the server fills its pages, then exits, well within
        # the deadline (600 s).
        assert server.proc.wait(60) == 0, server.log()[-3000:]
        log = server.log()
        assert "no longer accepting" in log and "each fills its missing pages now" in log
        assert "populating the" in log and "drained" in log and "Traceback" not in log
        assert "server stopping while pages are still missing" not in log
        assert not os.path.exists(server.socket_path)  # new VMMs get a clear refusal
        assert c.stdin is not None
        c.stdin.write("go\n")  # with no server left: every page must already be there
        c.stdin.flush()
        rc, res = finish(c)
        assert rc == 0 and res["ok"] and res["pages"] == SIZE // 4096, res  # every byte
    finally:
        c.kill()
        server.stop()


def test_drain_deadline_names_the_vm_and_a_second_sigterm_stops_at_once(
        tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    for second in (False, True):
        server = start_server(str(tmp_path), snap, "--drain-timeout",
                              "3600" if second else "0.5")
        c = client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1",
                               "--pause-after", "4"), stdin=subprocess.PIPE)
        # Its worker is stopped (SIGSTOP): the drain cannot fill the VM, as with a store
        # too slow to fetch it all in time.
        workers = serving_workers(server.proc.pid)
        try:
            assert c.stdout is not None and c.stdout.readline().strip() == "paused"
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            server.proc.send_signal(signal.SIGTERM)
            if second:
                wait_for(lambda s=server: "no longer accepting" in s.log(), 20, "the drain")
                server.proc.send_signal(signal.SIGTERM)
            line = f"vm pid={c.pid}: server stopping while pages are still missing"
            wait_for(lambda s=server, ln=line: ln in s.log(), 30, "the VM named")
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            try:
                assert server.proc.wait(30) == 0
            finally:
                c.kill()
                c.wait()
                server.stop()


def test_sighup_logs_the_state_writes_the_stats_and_serving_goes_on(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    server = start_server(str(tmp_path), snap)
    try:
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)])))
        assert rc == 0 and res["ok"], res
        for n in (1, 2):
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda n=n: server.log().count("SIGHUP: ") == n, 20, "the state line")
        assert "0 VM(s) connected (none), 1 ended" in server.log()
        assert server.stats()["total"]["faults"] > 0  # type: ignore[index]
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)])))
        assert rc == 0 and res["ok"], res  # still serving
    finally:
        assert server.stop() == 0


def test_the_start_up_line_is_logged_at_the_default_level(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = subprocess.Popen([*PAGEIN, "serve", "--socket", sock, "--mem-file", snap,
                             "--strategy", "readahead", "--workers", "1", "--exit-after", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"on {sock}: strategy readahead, engine" in line and "1 worker(s)" in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


# --- systemd ---------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_and_stopping(tmp_path: Path, abstract: bool) -> None:
    snap, _ = _snap(tmp_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"\0pagein-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    notify.bind(name)
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name[1:] if abstract else name}
    server = start_server(str(tmp_path), snap, "--drain-timeout", "5", env=env)
    try:
        first = notify.recv(4096).decode().splitlines()
        assert "READY=1" in first and any(x.startswith("STATUS=serving ") for x in first)
        server.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
        notify.close()


WRAPPER = """
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid())  # what systemd sets, for the exec'd process
os.environ["LISTEN_FDS"] = "1"
os.dup2(int(sys.argv[1]), 3)
os.execv(sys.executable, [sys.executable, "-m", "pagein", *sys.argv[2:]])
"""


def test_socket_activation_serves_on_the_inherited_listener(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    path = str(tmp_path / "fc.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    ino = os.stat(path).st_ino
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(listener.fileno()), "-v",
                             "serve", "--socket", path, "--mem-file", snap, "--exit-after",
                             "1"], pass_fds=(listener.fileno(),), stderr=subprocess.PIPE,
                            text=True)
    listener.close()  # the server holds it now, as a service holds systemd's
    try:
        # A VMM may connect before the server is up: the backlog holds it (systemd's way).
        c = client("touch", "--socket", path, "--mem-file", snap, "--regions", f"0:{SIZE}")
        rc, res = finish(c)
        assert rc == 0 and res["ok"], res
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert f"on {path} (from systemd)" in log, log
        assert os.stat(path).st_ino == ino  # never re-bound nor removed
    finally:
        proc.kill()
        proc.wait()


def test_socket_mode_with_socket_activation_is_refused(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    path = str(tmp_path / "fc.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        r = subprocess.run([sys.executable, "-c", WRAPPER, str(listener.fileno()), "serve",
                            "--socket", path, "--mem-file", snap, "--socket-mode", "0660"],
                           pass_fds=(listener.fileno(),), capture_output=True, text=True,
                           timeout=60)
    _one_line_error(r, "--socket-mode does not apply with socket activation")


# --- logging ---------------------------------------------------------------------------------

def test_log_format_json_from_the_supervisor_and_its_workers(tmp_path: Path) -> None:
    snap, _ = _snap(tmp_path)
    server = start_server(str(tmp_path), snap, "--log-format", "json", "--workers", "1")
    try:
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)])))
        assert rc == 0 and res["ok"], res
        assert server.stop() == 0
    finally:
        server.stop()
    docs = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    assert any(d.get("worker") == "worker 0" for d in docs), docs  # a worker's line
    assert any(isinstance(d.get("vm"), int) and d["logger"] == "pagein.serve"
               for d in docs), docs
