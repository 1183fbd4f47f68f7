"""The fault server: listen on a Unix socket, serve every VMM that connects, concurrently.

Each connection gets a thread: it receives and validates the handshake (with a
timeout), then runs a :class:`~pagein.serve.session.Session` until that VMM exits. A bad
handshake costs one log line naming the field and, by default, the VMM's life: the
handler kills the peer found through ``SO_PEERCRED`` (as Firecracker advises), because a
VMM whose memory nobody serves is frozen forever. Nothing one VM does stops the others.

The handler threads share one :class:`~pagein.snapshot.source.PageSource`. Fills are
ioctls through ctypes, which release the GIL, so sessions overlap in the kernel.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pagein.errors import HandshakeError, PageinError
from pagein.serve.firecracker import receive_handshake
from pagein.serve.session import DEFAULT_CHUNK_BYTES, Session, SessionEnd
from pagein.serve.stats import Counters, prometheus_text
from pagein.serve.strategies import Strategy
from pagein.snapshot.source import PageSource
from pagein.sys.fdpass import PeerCred, peer_credentials
from pagein.sys.uffd import Userfaultfd

__all__ = ["BadHandshakePolicy", "Server", "ServerConfig"]

log = logging.getLogger("pagein.serve")

_KEEP_ENDED = 1000  # ended VMs whose counters stay listed in the stats


def _listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class BadHandshakePolicy(enum.Enum):
    """What to do with a VMM whose handshake is invalid."""

    KILL = "kill"  # SIGKILL the peer (SO_PEERCRED): a frozen VMM helps nobody
    CLOSE = "close"  # close the connection and leave the peer alone


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket_path: str
    on_bad_handshake: BadHandshakePolicy = BadHandshakePolicy.KILL
    handshake_timeout: float = 5.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    exit_after: int | None = None  # stop once this many VM sessions have ended


@dataclass(slots=True)
class _VmRecord:
    peer: PeerCred
    session: Session
    thread: threading.Thread


class Server:
    """Serve VMs from one page source. Use :meth:`serve_forever` and :meth:`stop`.

    ``strategy_factory`` builds a fresh :class:`Strategy` for each VM.
    """

    def __init__(self, config: ServerConfig, source: PageSource,
                 strategy_factory: Callable[[], Strategy]) -> None:
        self.config = config
        self.source = source
        self._factory = strategy_factory
        self._lock = threading.Lock()
        self._vms: list[_VmRecord] = []
        self._ended: list[tuple[int, Counters, SessionEnd]] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wakes_on_signals = False
        self._threads: list[threading.Thread] = []
        self.handshake_failures = 0
        self._sessions_ended = 0
        self._listener = self._bind(config.socket_path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise PageinError(f"--socket {path} exists and is not a socket: "
                                  "remove it or choose another path")
            if _listening(path):
                raise PageinError(f"--socket {path} is in use by another running handler: "
                                  "stop it or choose another path")
            os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise PageinError(f"cannot listen on --socket {path}: {e.strerror}") from e
        return sock

    # --- running -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept VMMs until :meth:`stop`; then end every session and return."""
        log.info("serving %s (%d bytes) on %s", self.source.describe(), self.source.size,
                 self.config.socket_path)
        try:
            while True:
                ready = select.select([self._listener.fileno(), self._stop_r, self._sig_r],
                                      [], [])[0]
                if self._stop_r in ready:
                    break
                if self._sig_r in ready:
                    # Back in Python, the signal's handler has run (it may have called
                    # stop()); drain the wakeup bytes and look again.
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._sig_r, 4096)
                    continue
                try:
                    conn, _ = self._listener.accept()
                except OSError as e:
                    log.warning("accept failed: %s", e)
                    continue
                t = threading.Thread(target=self._handle, args=(conn,), daemon=True,
                                     name="pagein-vm")
                self._threads.append(t)
                t.start()
                self._threads = [t for t in self._threads if t.is_alive()]
        finally:
            self._shutdown()

    def wake_on_signals(self) -> None:
        """Make every signal wake :meth:`serve_forever` (``signal.set_wakeup_fd``).

        Python runs a signal's handler only between bytecodes: a SIGTERM that lands just
        before the wait starts would otherwise sit unhandled until the next VMM connects.
        Call from the main thread, after installing the handlers.
        """
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        self._wakes_on_signals = True

    def stop(self) -> None:
        """Ask :meth:`serve_forever` and every session to end (safe from a signal handler)."""
        if self._stop_w < 0:
            return  # already shut down
        with contextlib.suppress(BlockingIOError):
            os.write(self._stop_w, b"x")

    def _shutdown(self) -> None:
        with self._lock:
            live = [r for r in self._vms if r.session.end is None and not r.session.complete]
        for r in live:
            log.warning("vm pid=%d: server stopping while pages are still missing; its guest "
                        "will freeze on the next missing page", r.peer.pid)
        for t in list(self._threads):
            t.join(timeout=10)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)
        if self._wakes_on_signals:
            signal.set_wakeup_fd(-1)
            self._wakes_on_signals = False
        fds = (self._stop_r, self._stop_w, self._sig_r, self._sig_w)
        self._stop_r = self._stop_w = self._sig_r = self._sig_w = -1
        for fd in fds:
            os.close(fd)

    # --- one connection ------------------------------------------------------------

    def _handle(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError as e:
            log.warning("cannot read SO_PEERCRED of a new connection: %s", e)
            conn.close()
            return
        try:
            hs = receive_handshake(conn, self.source.size, self.config.handshake_timeout)
        except HandshakeError as e:
            self._bad_handshake(conn, peer, e)
            return
        except OSError as e:
            log.warning("vm pid=%d: handshake failed: %s", peer.pid, e)
            conn.close()
            return
        uffd = Userfaultfd.adopt(hs.uffd_fd, features=hs.features)
        try:
            session = Session(uffd=uffd, sock=conn, regions=hs.regions, source=self.source,
                              strategy=self._factory(), peer_pid=peer.pid,
                              stop_fd=self._stop_r, chunk_bytes=self.config.chunk_bytes,
                              pending=hs.rest)
        except (PageinError, OSError) as e:
            log.error("vm pid=%d: cannot start serving: %s; its guest is frozen", peer.pid, e)
            uffd.close()
            conn.close()
            return
        record = _VmRecord(peer, session, threading.current_thread())
        with self._lock:
            self._vms.append(record)
        log.info("vm pid=%d: serving %d regions (%d bytes) with %s", peer.pid,
                 len(hs.regions), sum(r.size_bytes for r in hs.regions),
                 session.strategy.name.value)
        end = SessionEnd.FAILED
        try:
            end = session.run()
        finally:
            session.close()
            with self._lock:
                self._vms.remove(record)
                self._ended.append((peer.pid, session.counters.snapshot(), end))
                self._sessions_ended += 1
                done = self._sessions_ended
                del self._ended[:-_KEEP_ENDED]
            if self.config.exit_after is not None and done >= self.config.exit_after:
                self.stop()

    def _bad_handshake(self, conn: socket.socket, peer: PeerCred, e: HandshakeError) -> None:
        self.handshake_failures += 1
        action = self.config.on_bad_handshake
        if action is BadHandshakePolicy.KILL and peer.pid > 1 and peer.pid != os.getpid():
            log.error("vm pid=%d: %s; killing the VMM (--on-bad-handshake close keeps it "
                      "alive)", peer.pid, e)
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer.pid, signal.SIGKILL)
        else:
            log.error("vm pid=%d: %s; closing the connection", peer.pid, e)
        conn.close()

    # --- stats ---------------------------------------------------------------------

    def per_vm(self) -> list[tuple[int, Counters, str]]:
        """Return ``(peer pid, counters, state)`` for live VMs and the ones that ended."""
        with self._lock:
            live = [(r.peer.pid, r.session.counters.snapshot(), "active") for r in self._vms]
            ended = [(pid, c, end.value) for pid, c, end in self._ended]
        return ended + live

    def totals(self) -> Counters:
        total = Counters()
        for _, c, _state in self.per_vm():
            total.add(c)
        return total

    def stats_doc(self) -> dict[str, object]:
        """The ``--stats-json`` document: totals and one entry per VM."""
        vms = self.per_vm()
        return {
            "source": self.source.describe(),
            "active_vms": sum(1 for *_, s in vms if s == "active"),
            "handshake_failures": self.handshake_failures,
            "total": self.totals().to_dict(),
            "vms": [{"peer_pid": pid, "state": state, **c.to_dict()} for pid, c, state in vms],
        }

    def prometheus(self) -> str:
        vms = self.per_vm()
        return prometheus_text([(str(pid), c) for pid, c, _ in vms],
                               sum(1 for *_, s in vms if s == "active"))
