"""A signal always reaches the server's wait, whichever thread the kernel delivers it to.

Python runs handlers only in the main thread, between bytecodes: a signal delivered to
another thread (or just before ``select()``) leaves the main thread asleep unless the
signal also wakes it through ``signal.set_wakeup_fd`` — which ``Server.wake_on_signals``
arranges. Without it a SIGTERM to ``pagein serve`` could wait for the next VMM.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

from pagein.serve.options import ServeOptions
from pagein.serve.served import Served
from pagein.serve.server import Server
from pagein.snapshot.raw import RawFileSource


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
