"""Serving worker processes as the supervisor sees them: start, ready, signal, reap.

A worker is forked by the **zygote** (:func:`pagein.serve.worker._zygote`) in a few
milliseconds, and becomes the supervisor's own child (the supervisor is a subreaper): it
is waited for and signalled through a pidfd, never by a pid that could be reused. Where
no zygote can run, a worker is a new interpreter (``python -m pagein.serve.worker``,
~0.5 s). :class:`WorkerFactory` also keeps one **spare** worker ready, source open, so
that the VMs of a worker that died are served again in milliseconds: the time a VM
waits is a control message, not a start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading

from pagein.errors import PageinError
from pagein.serve.control import ControlError, recv_msg, send_msg
from pagein.serve.engine import EngineName
from pagein.serve.handler import exit_status
from pagein.serve.logs import current_format
from pagein.serve.options import ServeOptions
from pagein.sys.fdpass import kill_through
from pagein.sys.process import set_child_subreaper

__all__ = ["WORKER_START_S", "WorkerCannotServe", "WorkerFactory", "WorkerProc", "Zygote"]

log = logging.getLogger("pagein.serve")

#: How long a worker (or the zygote) may take to say it is ready.
WORKER_START_S = 30.0


class WorkerCannotServe(PageinError):
    """A worker started and said it cannot serve (its source cannot be opened, or is not
    the file the supervisor opened): starting another will not help."""


def _exit_code(status: int) -> int:
    """A wait status as :attr:`subprocess.Popen.returncode` says it (-N: killed by N)."""
    return os.waitstatus_to_exitcode(status)


class WorkerProc:
    """One serving worker process and our end of its control channel.

    Started from the zygote (``proc`` None: its pid comes with its ``ready``, and it is
    our child through the subreaper; see :func:`pagein.serve.worker._zygote`), or by
    executing ``python -m pagein.serve.worker`` (:meth:`launch`) where there is none.
    """

    def __init__(self, index: int, ctl: socket.socket,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
        self.index = index
        self.ctl = ctl
        self.proc = proc
        self._pid = 0 if proc is None else proc.pid
        self._pidfd = -1
        self._reaped: int | None = None
        self.vms: set[int] = set()
        self.dedicated = False  # serves one suspect VM only, and ends with it
        self.retiring = False  # told to stop: its exit is no crash
        self.lock = threading.Lock()

    @classmethod
    def launch(cls, index: int, options: ServeOptions, engine: EngineName,
               identity: Identity = None) -> WorkerProc:
        """Start a worker by executing a new interpreter (~0.5 s: the slow way)."""
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pagein.serve.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        w = cls(index, ctl, proc)
        send_msg(ctl, _init_doc(options, engine, index, identity))
        return w

    def wait_ready(self, timeout: float) -> None:
        p = select.poll()
        p.register(self.ctl, select.POLLIN)
        if not p.poll(timeout * 1000):
            raise PageinError(f"serving worker {self.index} did not start within {timeout:g} s")
        try:
            got = recv_msg(self.ctl)
        except (ControlError, OSError) as e:
            raise PageinError(f"serving worker {self.index} failed to start: {e}") from e
        if got is None:
            code = self.kill()
            why = "exited" if code is None else f"exited with {exit_status(code)}"
            raise PageinError(f"serving worker {self.index} {why} while starting")
        doc, _ = got
        if doc.get("op") != "ready":
            raise WorkerCannotServe(f"serving worker {self.index} cannot serve: "
                              f"{str(doc.get('error'))[:500]}")
        if self.proc is None:
            self._adopt_pid(doc.get("pid"))

    def _adopt_pid(self, pid: object) -> None:
        """Take the pid a forked worker reported: it must be our child (the subreaper
        made it so), so it cannot name another process until we reap it."""
        if not isinstance(pid, int) or pid <= 1:
            raise PageinError(f"serving worker {self.index} reported no pid")
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)  # ChildProcessError: not our child
            self._pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise PageinError(f"serving worker {self.index} (pid {pid}) is not a child "
                              f"of the server: {e}") from e
        self._pid = pid
        if got:  # it already exited
            raise PageinError(f"serving worker {self.index} exited while starting")

    @property
    def pid(self) -> int:
        return self._pid

    def send(self, doc: dict[str, object], fds: list[int] | None = None) -> None:
        with self.lock:
            send_msg(self.ctl, doc, fds or [])

    def kill(self) -> int | None:
        """SIGKILL the worker unless it has exited; reap it; close our end; its status
        (None for a forked worker that never said its pid: it exits at the closed end)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            code: int | None = self.proc.wait()
        elif self._reaped is not None:
            code = self._reaped
        elif self._pid:
            kill_through(self._pidfd)
            _, status = os.waitpid(self._pid, 0)
            code = self._reaped = _exit_code(status)
            os.close(self._pidfd)
            self._pidfd = -1
        else:
            code = None
        self.ctl.close()
        return code

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the worker to exit by itself; whether it did."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        if not self._pid or self._reaped is not None:
            return True
        if not _readable(self._pidfd, timeout):
            return False
        _, status = os.waitpid(self._pid, 0)
        self._reaped = _exit_code(status)
        return True


def _readable(fd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


Identity = list[int] | None  # the memory file as the supervisor opened it (SourceGuard)


def _init_doc(options: ServeOptions, engine: EngineName, index: int,
              identity: Identity) -> dict[str, object]:
    return {"op": "init", "options": options.to_json(), "engine": engine.value,
            "index": index, "identity": identity,
            "log_level": logging.getLogger("pagein").getEffectiveLevel(),
            "log_format": current_format().value}


class Zygote:
    """The process that forks serving workers (:func:`pagein.serve.worker._zygote`)."""

    def __init__(self, options: ServeOptions, engine: EngineName, identity: Identity) -> None:
        self.lock = threading.Lock()
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagein.serve.worker", "--zygote",
                 str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        try:
            send_msg(self.ctl, _init_doc(options, engine, 0, identity))
            if not _readable(self.ctl.fileno(), WORKER_START_S):
                raise PageinError(f"the worker zygote did not start within "
                                  f"{WORKER_START_S:g} s")
            got = recv_msg(self.ctl)
            if got is None or got[0].get("op") != "ready":
                raise PageinError("the worker zygote failed to start (see its log above)")
        except BaseException:
            self.close()
            raise

    def fork(self, index: int, init: dict[str, object] | None = None) -> WorkerProc:
        """A new worker (not yet ready: call its ``wait_ready``); ``init`` overrides the
        zygote's own options and identity for it (a zygote shared by several snapshots)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request: dict[str, object] = {"op": "fork", "index": index}
        if init is not None:
            request["init"] = init
        try:
            with self.lock:
                send_msg(self.ctl, request, [theirs.fileno()])
                theirs.close()
                if not _readable(self.ctl.fileno(), WORKER_START_S):
                    raise PageinError("the worker zygote did not answer")
                got = recv_msg(self.ctl)
        except (OSError, ControlError) as e:
            ours.close()
            raise PageinError(f"the worker zygote failed: {e}") from e
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if got is None or got[0].get("op") != "forked" or got[0].get("error"):
            ours.close()
            why = "it exited" if got is None else str(got[0].get("error"))[:200]
            raise PageinError(f"the worker zygote cannot fork a worker: {why}")
        return WorkerProc(index, ours)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.ctl.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WorkerFactory:
    """Make ready workers: from the spare when there is one, else forked by the zygote
    (restarted once if it died), else executed. Thread-safe.

    ``zygote``: one the caller owns and shares among several factories (one daemon
    serving several snapshots: one zygote for all); each fork then says this factory's
    options and identity. Without one the factory starts (and closes) its own.
    """

    def __init__(self, options: ServeOptions, engine: EngineName,
                 identity: Identity = None, zygote: Zygote | None = None) -> None:
        self.options = options
        self.engine = engine
        self.identity = identity  # every worker holds its memory file to it
        self._lock = threading.Lock()
        self._zygote: Zygote | None = zygote
        self._shared = zygote is not None
        self._init: dict[str, object] = {"options": options.to_json(), "identity": identity}
        self._spare: WorkerProc | None = None
        self._refilling = False
        self._closed = False
        if zygote is None:
            self._start_zygote()

    def _start_zygote(self) -> None:
        try:
            set_child_subreaper()
            self._zygote = Zygote(self.options, self.engine, self.identity)
        except (PageinError, OSError) as e:
            log.warning("no worker zygote (%s): a worker takes ~0.5 s to start instead "
                        "of milliseconds", e)
            self._zygote = None

    def new(self, index: int) -> WorkerProc:
        """A worker process that is starting (call its ``wait_ready``)."""
        with self._lock:
            for _ in range(2):
                z = self._zygote
                if z is None or self._closed:
                    break
                try:
                    return z.fork(index, self._init if self._shared else None)
                except PageinError as e:
                    if self._shared:  # not ours to replace: execute this worker instead
                        log.error("%s; starting the worker without it", e)
                        break
                    log.error("%s; starting another zygote", e)
                    z.close()
                    self._zygote = None
                    self._start_zygote()
        return WorkerProc.launch(index, self.options, self.engine, self.identity)

    def ready(self, index: int) -> WorkerProc:
        """A ready worker numbered ``index``: the spare if it is alive, else a new one.
        Raises :class:`PageinError` when it cannot start."""
        with self._lock:
            spare, self._spare = self._spare, None
        self.refill()
        if spare is not None:
            try:
                spare.send({"op": "adopt", "index": index})
                spare.index = index
                return spare
            except OSError:
                spare.kill()  # it died waiting; start one instead
        w = self.new(index)
        try:
            w.wait_ready(WORKER_START_S)
        except BaseException:
            w.kill()
            raise
        return w

    def refill(self) -> None:
        """Start a spare in the background unless one is ready or starting."""
        with self._lock:
            if self._spare is not None or self._refilling or self._closed:
                return
            self._refilling = True
        threading.Thread(target=self._make_spare, daemon=True, name="pagein-spare").start()

    def _make_spare(self) -> None:
        w: WorkerProc | None = None
        try:
            w = self.new(-1)
            w.wait_ready(WORKER_START_S)
        except (PageinError, OSError) as e:
            log.warning("cannot start a spare serving worker: %s", e)
            if w is not None:
                w.kill()
            w = None
        with self._lock:
            self._refilling = False
            if w is not None and not self._closed:
                self._spare, w = w, None
        if w is not None:  # closed meanwhile
            w.kill()

    def close(self) -> None:
        """Stop the spare and the zygote (the workers in use are the caller's)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            z, self._zygote = self._zygote, None
        if self._shared:
            z = None  # its owner closes it
        if spare is not None:
            with contextlib.suppress(OSError):
                spare.send({"op": "stop"})
            spare.wait(5)
            spare.kill()
        if z is not None:
            z.close()
