"""A ``pagein serve`` process that a restore spawns for itself: :class:`HandlerProcess`.

:func:`pagein.serve.local.restore_lazily`, the VMM's lazy restore and the demo all start
their handler this way: from a :class:`~pagein.serve.options.ServeOptions` (the only
place that turns options into a command line), in its own session, listening in a
private directory, logging to ``handler.log`` there, and signalling a ready pipe once it
listens, so the VMM can connect at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from pagein.errors import HandlerError
from pagein.serve.options import BadHandshakePolicy, ServeOptions
from pagein.sys.poll import wait_readable

__all__ = ["HandlerProcess", "exit_status"]


def exit_status(code: int) -> str:
    """``status 1``, or ``status -9 (killed by SIGKILL)`` for a Popen returncode."""
    if code < 0:
        try:
            return f"status {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"status {code} (killed by signal {-code})"
    return f"status {code}"


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


class HandlerProcess:
    """A running ``pagein serve`` and where it listens; :attr:`proc` is the process."""

    def __init__(self, proc: subprocess.Popen[bytes], options: ServeOptions,
                 workdir: str) -> None:
        self.proc = proc
        self.options = options
        self.workdir = workdir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> str:
        return self.options.socket_path

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "handler.log")

    @staticmethod
    def options_for_one_vm(source: str, workdir: str, **changes: object) -> ServeOptions:
        """Options for a handler that serves one VM and exits when it has gone: its socket
        and stats file in ``workdir``, served in the handler process itself (no worker
        processes: one VM needs no parallelism, and killing the handler stops it), bad
        handshakes closed, not killed, and no drain on SIGTERM (its one VM has already
        gone or been unmapped when its owner stops it)."""
        base = ServeOptions(socket_path=os.path.join(workdir, "handler.sock"), source=source,
                            on_bad_handshake=BadHandshakePolicy.CLOSE, exit_after=1,
                            drain_timeout=0.0,
                            stats_json=os.path.join(workdir, "stats.json"), workers=0)
        return base.with_(**changes)

    @classmethod
    def start(cls, options: ServeOptions, workdir: str, timeout: float) -> HandlerProcess:
        """Start ``pagein serve`` with ``options``; return once it listens.

        Raises :class:`HandlerError` with the log's last line when it exits first or
        does not listen within ``timeout`` seconds.
        """
        r, w = os.pipe2(os.O_CLOEXEC)
        cmd = [sys.executable, "-m", "pagein", "-v", *options.to_argv(), "--ready-fd", str(w)]
        with open(os.path.join(workdir, "handler.log"), "wb") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    pass_fds=(w,), start_new_session=True)
        os.close(w)
        eof = None
        try:
            # EOF on the pipe (the handler exited) wakes this as well as "ready".
            ready = b""
            if wait_readable([r], timeout):
                ready = eof = os.read(r, 64)
        finally:
            os.close(r)
        handler = cls(proc, options, workdir)
        if not ready:
            # EOF before "ready" means it exited, though its status may take a moment to
            # be reapable: wait for it rather than report a timeout that never happened.
            code = proc.poll() if eof is None else _wait(proc, 5.0)
            proc.kill()
            proc.wait()
            why = (f"exited with {exit_status(code)} during start" if code is not None
                   else f"did not start within {timeout:g} s")
            tail = handler.last_log_line()
            raise HandlerError(f"the pagein handler for {options.source} {why}"
                               f"{': ' + tail if tail else ''}")
        return handler

    def stop(self, timeout: float = 10.0, *, grace: float = 0.0) -> int:
        """Give the handler ``grace`` seconds to exit by itself (one serving one VM exits
        when it has gone, after writing a recording), then SIGTERM it, wait ``timeout``
        seconds and SIGKILL it; return its exit status."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def last_log_line(self) -> str:
        """The handler log's last line ('' when there is none)."""
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:500] if lines else ""
