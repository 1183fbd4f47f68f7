"""A signal always reaches the server's wait, whichever thread the kernel delivers it to.

Python runs handlers only in the main thread, between bytecodes: a signal delivered to
another thread (or just before ``select()``) leaves the main thread asleep unless the
signal also wakes it through ``signal.set_wakeup_fd`` — which ``Server.wake_on_signals``
arranges. Without it a SIGTERM to ``pagein serve`` could wait for the next VMM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pagein.serve.options import ServeOptions
from pagein.serve.served import Served
from pagein.serve.server import Server
from pagein.snapshot.raw import RawFileSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import make_snapshot, start_server, wait_for
from vmm_peer import PAGE, connect

SIZE = 1 << 20


def test_a_signal_delivered_to_another_thread_still_stops_the_server(tmp_path: Path) -> None:
    mem = tmp_path / "m.mem"
    mem.write_bytes(b"\1" * 8192)
    with RawFileSource(str(mem)) as src:
        opts = ServeOptions(str(tmp_path / "s.sock"), str(mem), workers=0)
        server = Server(Served.of(src, opts))

        def on_signal(_sig: int, _frame: FrameType | None) -> None:
            server.stop()

        old = signal.signal(signal.SIGUSR2, on_signal)
        timed_out = threading.Event()

        def watchdog() -> None:  # ends the test instead of hanging it, and says so
            if not stopped.wait(10):
                timed_out.set()
                server.stop()

        def deliver() -> None:  # the kernel picks this thread, not the main one
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)

        stopped = threading.Event()
        try:
            server.wake_on_signals()
            threading.Thread(target=watchdog, daemon=True).start()
            threading.Timer(0.2, deliver).start()
            server.serve_forever()
            stopped.set()
        finally:
            signal.signal(signal.SIGUSR2, old)
        assert not timed_out.is_set(), "the signal did not wake serve_forever"
        assert signal.set_wakeup_fd(-1) == -1  # the server gave the wakeup fd back


def test_sigusr1_with_an_unwritable_stats_file_costs_one_line_and_serving_goes_on(
        tmp_path: Path) -> None:
    """Issue 13, finding 6: the SIGUSR1 handler wrote the stats itself, so an exception
    from the write unwound serve_forever and froze every VM. Now the handler sets a flag,
    the loop writes, and a failure is one log line."""
    snap = str(tmp_path / "mem.snap")
    data = make_snapshot(snap, SIZE)
    blocker = tmp_path / "not-a-dir"
    blocker.mkdir()  # writable at start (checked then), replaced by a file once serving
    stats = blocker / "stats.json"
    server = start_server(str(tmp_path), snap, "--stats-json", str(stats))
    blocker.rmdir()
    blocker.write_text("a file where the stats directory should be\n")  # ENOTDIR, even for root
    peer = connect(server.socket_path, 16 * PAGE)
    try:
        assert peer.read(0) == data[:PAGE]
        os.kill(server.proc.pid, signal.SIGUSR1)
        wait_for(lambda: "cannot write --stats-json" in server.log(), 20, "the failure line")
        for page in range(1, 16):  # pages nobody asked for before the signal
            assert peer.read(page) == data[page * PAGE:(page + 1) * PAGE], page
        assert peer.stats()["faults"] == 16
        assert server.proc.poll() is None
        lines = [ln for ln in server.log().splitlines() if "cannot write --stats-json" in ln]
        assert len(lines) == 1 and "Not a directory" in lines[0], lines
        blocker.unlink()  # the path works again: SIGTERM writes it and stops cleanly
        blocker.mkdir()
        assert server.stop() == 0
        doc = json.loads(stats.read_text())
        assert doc["vms"][0]["peer_pid"] == os.getpid() and doc["vms"][0]["faults"] == 16
        assert "Traceback" not in server.log()
    finally:
        peer.close()
        server.stop()


def test_stats_file_still_unwritable_at_exit_is_logged_and_the_status_says_so(
        tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    (tmp_path / "f").mkdir()
    server = start_server(str(tmp_path), snap, "--stats-json", str(tmp_path / "f" / "s.json"))
    (tmp_path / "f").rmdir()
    (tmp_path / "f").write_text("")
    assert server.stop() == 1
    lines = [ln for ln in server.log().splitlines() if "cannot write --stats-json" in ln]
    assert len(lines) == 1 and "Traceback" not in server.log()
