"""One ``pagein serve`` for many snapshots (issue 17): ``--config`` and ``--snapshot``,
each snapshot on its own socket, SIGHUP adding and removing snapshots without a restart,
metrics labelled by snapshot, and a bad entry refused naming the entry and the field.
Real processes throughout: the daemon, its workers and Firecracker-faithful clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagein.sys.poll import wait_readable
from serve_harness import ServerProc, client, finish, make_snapshot, wait_for

pytestmark = pytest.mark.kernel

SIZE = 256 << 10  # 64 pages: enough to tell two snapshots apart, cheap to serve
PAGEIN = [sys.executable, "-m", "pagein"]


def _snaps(tmp: Path, *names: str) -> dict[str, str]:
    """A snapshot per name, of one size and different bytes (a mix-up cannot pass)."""
    out = {}
    for seed, name in enumerate(names, 1):
        out[name] = str(tmp / f"{name}.mem")
        make_snapshot(out[name], SIZE, seed=seed)
    return out


def _write_config(path: Path, sockets: Path, snaps: dict[str, str], extra: str = "") -> None:
    body = [f'socket_dir = "{sockets}"', "", "[defaults]", 'strategy = "on-demand"', ""]
    for name, mem in snaps.items():
        body += [f"[snapshots.{name}]", f'source = "{mem}"', ""]
    path.write_text("\n".join(body) + extra)


def _start(tmp: Path, *args: str) -> ServerProc:
    log_path, stats = str(tmp / "fleet.log"), str(tmp / "stats.json")
    r, w = os.pipe()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([*PAGEIN, "-v", "serve", *args, "--stats-json", stats,
                                 "--ready-fd", str(w)], stdout=logf, stderr=logf,
                                pass_fds=(w,))
    os.close(w)
    try:
        ready = wait_readable([r], 30) and os.read(r, 16)
    finally:
        os.close(r)
    server = ServerProc(proc, "", log_path, stats)
    if not ready:
        server.stop()
        raise RuntimeError(f"pagein serve did not start: {server.log()}")
    return server


def _touch(sock: Path, mem: str, *extra: str,
           stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return client("touch", "--socket", str(sock), "--mem-file", mem, "--regions",
                  f"0:{SIZE}", "--threads", "1", *extra, stdin=stdin)


def _children_named(pid: int, name: str) -> int:
    """How many live children of ``pid`` are named ``name`` (``/proc/PID/comm``)."""
    kids: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:  # a thread that ended meanwhile
            continue
    count = 0
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as f:
                count += f.read().strip() == name
        except OSError:
            continue
    return count


def _served_whole(c: subprocess.Popen[str]) -> None:
    """The client read every page and each equals its snapshot's (fcclient checks)."""
    rc, res = finish(c)
    assert rc == 0 and res["ok"] and res["pages"] == SIZE // 4096, res


def test_two_snapshots_one_daemon_each_client_gets_its_own_bytes(tmp_path: Path) -> None:
    snaps = _snaps(tmp_path, "web", "db")
    sockets = tmp_path / "sockets"
    config = tmp_path / "fleet.toml"
    _write_config(config, sockets, snaps)
    server = _start(tmp_path, "--config", str(config), "--drain-timeout", "0",
                    "--metrics-port", "0")
    try:
        for name, mem in snaps.items():
            _served_whole(_touch(sockets / f"{name}.sock", mem))
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log())
        assert port is not None, server.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        for name in snaps:  # every series names its snapshot; each served its own faults
            faults = re.search(rf'^pagein_faults_total{{snapshot="{name}"}} (\S+)$', text,
                               re.MULTILINE)
            assert faults is not None and float(faults.group(1)) > 0, text[:3000]
        assert re.search(r'pagein_vm_faults_total\{pid="\d+",session="1",snapshot="db"\}',
                         text)
        assert "web vm pid=" in server.log()  # log lines name the snapshot
        # One zygote forks the workers of both snapshots, not one zygote each.
        assert _children_named(server.proc.pid, "pagein-zygote") == 1
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    stats = server.stats()["snapshots"]
    assert set(stats) == {"web", "db"}  # type: ignore[arg-type]
    assert all(s["sessions_ended"] == 1 for s in stats.values())  # type: ignore[union-attr]


def test_sighup_adds_and_removes_snapshots_without_dropping_a_running_vm(
        tmp_path: Path) -> None:
    snaps = _snaps(tmp_path, "a", "b")
    sockets = tmp_path / "sockets"
    config = tmp_path / "fleet.toml"
    _write_config(config, sockets, {"a": snaps["a"]})
    server = _start(tmp_path, "--config", str(config), "--drain-timeout", "30")
    running = _touch(sockets / "a.sock", snaps["a"], "--pause-after", "4",
                     stdin=subprocess.PIPE)
    try:
        assert running.stdout is not None and running.stdout.readline().strip() == "paused"
        assert not (sockets / "b.sock").exists()
        _write_config(config, sockets, snaps)  # b added
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reloaded" in server.log(), 30, "the reload line")
        assert "1 snapshot(s) added, 0 changed, 0 removed (draining), 2 serving" in \
            server.log()
        _served_whole(_touch(sockets / "b.sock", snaps["b"]))
        config.write_text("[snapshots.broken\n")  # a file that does not parse: no change
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "not reloading" in server.log(), 30, "the refusal")
        assert (sockets / "a.sock").exists() and (sockets / "b.sock").exists()
        assert running.stdin is not None
        running.stdin.write("go\n")  # the VM of a, attached all along, finishes
        running.stdin.flush()
        _served_whole(running)
        _write_config(config, sockets, {"b": snaps["b"]})  # a removed
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "0 snapshot(s) added, 0 changed, 1 removed" in server.log(), 30,
                 "the removal")
        wait_for(lambda: not (sockets / "a.sock").exists(), 30, "a's socket to go")
        _served_whole(_touch(sockets / "b.sock", snaps["b"]))
        assert server.proc.poll() is None and "Traceback" not in server.log()
    finally:
        running.kill()
        assert server.stop(30) == 0, server.log()[-3000:]


BAD_ENTRIES = [
    ('strategy = "fastest"\n', "[snapshots.vm1]: strategy = 'fastest' is not one of"),
    ('readahead_size = "1M"\n',  # on-demand ignores it: named as the field, not the flag
     "[snapshots.vm1]: readahead_size does nothing with strategy on-demand"),
    ("workers = -1\n", "[snapshots.vm1]: workers = '-1' must be a whole number"),
    ('colour = "blue"\n', "[snapshots.vm1]: unknown field 'colour'"),
]


@pytest.mark.parametrize(("line", "words"), BAD_ENTRIES)
def test_a_bad_config_entry_is_one_line_naming_the_entry_and_the_field(
        tmp_path: Path, line: str, words: str) -> None:
    config = tmp_path / "fleet.toml"
    mem = str(tmp_path / "vm1.mem")
    make_snapshot(mem, SIZE)
    config.write_text(f'socket_dir = "{tmp_path}"\n\n[snapshots.ok]\nsource = "{mem}"\n\n'
                      f'[snapshots.vm1]\nsource = "{mem}"\n{line}')
    r = subprocess.run([*PAGEIN, "serve", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"pagein: error: {config}: "), \
        r.stderr
    assert words in r.stderr, r.stderr
    assert not (tmp_path / "ok.sock").exists()  # nothing was served


def test_snapshot_flags_serve_each_on_socket_dir(tmp_path: Path) -> None:
    """The form without a file: ``--socket-dir DIR --snapshot NAME=SOURCE ...``."""
    snaps = _snaps(tmp_path, "one", "two")
    sockets = tmp_path / "run"
    server = _start(tmp_path, "--socket-dir", str(sockets), "--drain-timeout", "0",
                    *(f"--snapshot={n}={m}" for n, m in snaps.items()))
    try:
        for name, mem in snaps.items():
            _served_whole(_touch(sockets / f"{name}.sock", mem))
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert not any(sockets.glob("*.sock"))  # each socket removed at exit
