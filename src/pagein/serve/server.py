"""The fault server's supervisor: its lifecycle (start, serve, drain, stop) and its
stats.

``pagein serve`` is this small supervisor plus serving workers
(:mod:`pagein.serve.worker`, child processes, one per CPU by default). The supervisor
binds the socket once the workers are ready; :mod:`pagein.serve.admit` takes each
connection (allow-list, handshake, identity and region checks) and hands each good VM
to :mod:`pagein.serve.pool`, which gives it — uffd, socket and state memfd, over
SCM_RIGHTS — to the worker serving the fewest VMs, and replaces a worker that dies.

The supervisor keeps its own copies of each VM's uffd, socket and state until the
worker says the VM has gone: if every holder of a uffd closed it, the guest would
silently read zero pages, so a dying worker can freeze its guests but never corrupt
them. It reads every VM's counters straight from the shared state for the stats file
and the metrics endpoint, without asking the workers. Nothing one VM does stops the
others.

Imports run one way: server -> admit -> pool -> workers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable

import pagein
from pagein.errors import ConfigError
from pagein.serve.accept import Acceptor, raise_fd_limit
from pagein.serve.access import listen_unix
from pagein.serve.admit import Admission
from pagein.serve.identity import FileDigests
from pagein.serve.logs import LIFECYCLE
from pagein.serve.options import BadHandshakePolicy, ServeOptions
from pagein.serve.pagecache import PageCaches
from pagein.serve.pool import Pool
from pagein.serve.served import Served
from pagein.serve.session import choose
from pagein.serve.stats import Counters, ServerSample, VmRow, write_json
from pagein.serve.workers import Zygote
from pagein.sys.systemd import notify

__all__ = ["BadHandshakePolicy", "Server"]

log = logging.getLogger("pagein.serve")
lifecycle = logging.getLogger(LIFECYCLE)  # start, drain, stop: logged at any level



def _listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` now.

    Connects and closes without a byte: a server of ours takes that for a probe and
    leaves this process alone (see :meth:`Admission._bad_handshake
    <pagein.serve.admit.Admission._bad_handshake>`).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _can_replace(path: str, st: os.stat_result) -> bool:
    """Whether this user may rename a file over ``path`` (write and search on its
    directory, and not barred by the directory's sticky bit)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        pst = os.stat(parent)
    except OSError:
        return False
    if not os.access(parent, os.W_OK | os.X_OK):
        return False
    uid = os.geteuid()
    return not (pst.st_mode & stat.S_ISVTX) or uid in (st.st_uid, pst.st_uid)

class Server:
    """Serve VMs from one page source. Use :meth:`serve_forever` and :meth:`stop`.

    ``served`` is the source opened by the caller (:func:`~pagein.serve.served.open_served`):
    the supervisor checks each handshake against its size and names it in logs; worker
    processes open their own from the options, ``--workers 0`` serves this one.
    """

    def __init__(self, served: Served, *, listener: socket.socket | None = None,
                 zygote: Zygote | None = None) -> None:
        self.options = options = served.options
        # A listener systemd bound (socket activation): used as is, never unlinked.
        self._inherited = listener
        self.source = served.source
        self._served = served
        digests = FileDigests(served.file_path(), served.source.size,
                              options.memory_sha256, served.source.describe(),
                              served.layer_sha256())
        self.engine, why = choose(options.engine)
        if why is not None:
            log.warning("engine: python (%s)", why)
        self._guard = served.guard
        if options.worker_count == 0:
            # Serving from this process: watch its file. Workers watch their own (and
            # hold it to this file's identity), so a supervisor that serves nothing
            # holds no lease and logs nothing twice.
            served.guard.start()
        self._caches = PageCaches(served.source.size, served.source.describe(),
                                  options.page_cache_keep)
        self._pool = Pool(served, self.engine, self._caches, self._on_ended, zygote)
        self._admission = Admission(options, served.source, digests, self._pool,
                                    self._caches)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wakes_on_signals = False
        self._stop_wanted = False
        self._drain_wanted = False
        self._draining_since: float | None = None
        self._stats_wanted = False
        self._state_wanted = False
        self._stopping_now = False
        self._socket_id: tuple[int, int] | None = None  # (dev, ino) of the socket we bound
        self._access = options.access
        # One of several snapshots one daemon serves (pagein.serve.fleet): the fleet talks
        # to the service manager, and this server's lifecycle lines name its snapshot.
        self._member = options.snapshot is not None
        self._label = f"snapshot {options.snapshot}: " if self._member else ""
        if listener is None:
            self._check_path(options.socket_path)
        before, self.fd_limit = raise_fd_limit()
        if before != self.fd_limit:
            log.info("open-file limit raised from %d to the hard limit %d (RLIMIT_NOFILE; "
                     "about %d VMs at 4 fds each)", before, self.fd_limit, self.fd_limit // 4)
        self._pool.start(self._bind_listener)

    def _bind_listener(self) -> None:
        self._listener = self._bind(self.options)

    def _on_ended(self, done: int) -> None:
        """A session ended (``done`` so far): ``--exit-after`` may stop the server."""
        limit = self.options.exit_after
        if limit is not None and done >= limit:
            self.stop()

    @property
    def handshake_failures(self) -> int:
        return self._admission.handshake_failures

    @property
    def refused_peers(self) -> int:
        return self._admission.refused_peers

    @property
    def worker_restarts(self) -> int:
        return self._pool.worker_restarts

    @property
    def worker_start_failures(self) -> int:
        return self._pool.worker_start_failures

    @staticmethod
    def _check_path(path: str) -> None:
        """Refuse a path that is not a socket, that a running handler listens on, or that
        holds a stale socket this user cannot replace. Raises :class:`ConfigError`."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"--socket {path}: {e.strerror}: choose another path") from e
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--socket {path} exists and is not a socket: "
                              "remove it or choose another path")
        if _listening(path):
            raise ConfigError(f"--socket {path} is in use by another running handler: "
                              "stop it or choose another path")
        uid = os.geteuid()
        if uid != 0 and st.st_uid != uid and not _can_replace(path, st):
            raise ConfigError(f"--socket {path}: a socket owned by uid {st.st_uid} is there "
                              f"and this user (uid {uid}) cannot replace it: remove it as "
                              "its owner, or choose another path")

    def _bind(self, options: ServeOptions) -> socket.socket:
        """Listen with the socket's final permissions from the start; a stale socket of
        an earlier run is replaced atomically. The backlog has room for a thousand VMMs
        connecting at once (the kernel caps it at net.core.somaxconn): a full backlog
        makes the next VMM's connect() wait. A listener systemd passed is used as is."""
        if self._inherited is not None:
            return self._inherited
        self._check_path(options.socket_path)
        sock = listen_unix(options.socket_path, options.socket_permissions,
                           options.socket_group, backlog=1024)
        with contextlib.suppress(OSError):
            st = os.lstat(options.socket_path)
            self._socket_id = (st.st_dev, st.st_ino)
        return sock

    def _unlink_socket(self) -> None:
        """Remove the socket file if it is still the one this server bound (a newer
        server may have replaced it; systemd owns an inherited one)."""
        ours, self._socket_id = self._socket_id, None
        path = self.options.socket_path
        try:
            st = os.lstat(path)
            if ours is not None and (st.st_dev, st.st_ino) == ours:
                os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot remove --socket %s: %s", path, e.strerror)

    # --- running -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept VMMs until :meth:`stop` (or a drain ends); then end every session.

        :meth:`request_stop` (SIGTERM) drains: the listener is closed (and its socket
        file removed) so new VMMs get a clear refusal, and the VMs already attached get
        ``--drain-timeout`` seconds to finish (go, or have every page in place); a
        second request stops at once.
        """
        self._announce()
        poller = select.poll()
        for fd in (self._stop_r, self._sig_r):
            poller.register(fd, select.POLLIN)
        acceptor = Acceptor(self._listener, self.fd_limit, lambda: len(self._pool.vms))
        try:
            while not self._stop_wanted:
                if self._stats_wanted:
                    self._stats_wanted = False
                    self.write_stats()
                if self._state_wanted:
                    self._state_wanted = False
                    self._log_state()
                if self._drain_wanted and self._draining_since is None:
                    self._begin_drain(poller, acceptor)
                if self._draining_since is not None:
                    if self._drained():
                        break
                    timeout: int | None = 100  # check the VMs ten times a second
                else:
                    acceptor.watch(poller)
                    timeout = acceptor.wait_ms()
                ready = {fd for fd, _ in poller.poll(timeout)}
                if self._stop_r in ready:
                    break
                if self._sig_r in ready:
                    # Back in Python, the signal's handler has run (it may have set a
                    # flag, which the top of the loop acts on); drain the wakeup bytes.
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._sig_r, 4096)
                    continue
                if self._draining_since is None and acceptor.fileno() in ready:
                    self._admission.accept(acceptor)
        finally:
            self._shutdown()

    def _announce(self) -> None:
        """The start-up line (at the default level) and READY=1 to a service manager."""
        where = (f"{self.options.socket_path} (from systemd)" if self._inherited is not None
                 else self.options.socket_path)
        workers = "in this process" if self.options.worker_count == 0 else \
            f"{len(self._pool.workers)} worker(s)"
        lifecycle.info("%spagein %s serving %s (%d bytes) on %s: strategy %s, engine %s, %s",
                       self._label, pagein.__version__, self.source.describe(),
                       self.source.size, where, self.options.strategy.value,
                       self.engine.value, workers)
        if self._inherited is None:
            log.info("socket mode %04o; serving %s", self.options.socket_permissions,
                     self._access.describe())
        else:
            log.info("serving %s (the socket's mode and group are the .socket unit's)",
                     self._access.describe())
        if not self._member:
            notify("READY=1", f"STATUS=serving {self.source.describe()}"[:200])

    # --- draining (SIGTERM) -------------------------------------------------------------

    def _begin_drain(self, poller: select.poll, acceptor: Acceptor) -> None:
        """Stop accepting: close the listener (and remove our socket file) at once, so a
        new VMM's connect fails instead of waiting in a backlog nobody reads."""
        self._draining_since = time.monotonic()
        with contextlib.suppress(KeyError, ValueError):
            poller.unregister(acceptor.fileno())
        self._close_listener()
        self._pool.populate_all()
        with self._pool.lock:
            live = len(self._pool.vms)
        if not self._member:
            notify("STOPPING=1", f"STATUS=draining {live} VM(s)")
        lifecycle.info("%sSIGTERM: no longer accepting; draining %d VM(s) for up to %g s "
                       "(--drain-timeout; a second SIGTERM stops at once): each fills its "
                       "missing pages now", self._label, live, self.options.drain_timeout)

    def _drained(self) -> bool:
        """Whether the drain is over: every VM gone or complete, or the deadline passed
        (then each VM still missing pages is named)."""
        if self._admission.attaching():  # handshakes under way count as VMs attaching
            return self._past_drain_deadline()
        with self._pool.lock:
            waiting = [vm for vm in self._pool.vms.values() if not vm.state.complete()]
        if not waiting:
            lifecycle.info("%sdrained: every VM has gone or has all its pages", self._label)
            return True
        return self._past_drain_deadline()

    def _past_drain_deadline(self) -> bool:
        assert self._draining_since is not None
        return time.monotonic() - self._draining_since >= self.options.drain_timeout

    def _close_listener(self) -> None:
        if self._listener.fileno() >= 0:
            self._listener.close()
        self._unlink_socket()

    def _log_state(self) -> None:
        """SIGHUP: one line with the server's state (and the stats file rewritten)."""
        rows = self.rows()
        live = [r for r in rows if r.state == "active"]
        total = self.totals()
        lifecycle.info("%sSIGHUP: %d VM(s) connected (%s), %d ended, %d worker(s), %d faults "
                       "served, %d handshake failure(s), %d refused peer(s)", self._label,
                       len(live),
                       ", ".join(f"vm pid={r.peer_pid}" for r in live[:20])
                       + (", ..." if len(live) > 20 else "") if live else "none",
                       len(rows) - len(live), len(self._pool.workers), total.faults,
                       self.handshake_failures, self.refused_peers)

    # Signal handlers only set these flags: the handler runs between two bytecodes of
    # the main thread, inside serve_forever, and anything it raised (a stats file that
    # cannot be written) would unwind serve_forever and freeze every VM.

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to drain, or, asked again (or with
        ``--drain-timeout 0``), to stop at once (for SIGTERM: sets a flag)."""
        if self._drain_wanted or self.options.drain_timeout <= 0:
            self._stop_wanted = True
        self._drain_wanted = True
        self._wake()

    def request_stop_now(self) -> None:
        """Ask :meth:`serve_forever` to stop without draining (for SIGINT: sets a flag)."""
        self._drain_wanted = self._stop_wanted = True
        self._wake()

    def request_state(self) -> None:
        """Ask :meth:`serve_forever` to log its state and write the stats (SIGHUP)."""
        self._state_wanted = self._stats_wanted = True
        self._wake()

    def request_stats(self) -> None:
        """Ask :meth:`serve_forever` to write ``--stats-json`` (for SIGUSR1: sets a flag)."""
        self._stats_wanted = True
        self._wake()

    def _wake(self) -> None:
        """Wake :meth:`serve_forever` to act on a flag (when no signal does: a fleet's
        servers are asked from another thread)."""
        if self._sig_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._sig_w, b"w")

    def accepting(self) -> bool:
        """Whether the listener is still open (False once a drain or stop began)."""
        return self._draining_since is None and not self._stopping_now and \
            self._listener.fileno() >= 0

    def write_stats(self) -> bool:
        """Write the stats document to ``--stats-json`` (if given); False when it failed,
        which costs one log line and nothing else: serving goes on."""
        path = self.options.stats_json
        if path is None:
            return True
        try:
            write_json(path, self.stats_doc())
        except OSError as e:
            log.error("cannot write --stats-json %s: %s; serving goes on", path,
                      e.strerror or e)
            return False
        return True

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
        self._pool.stopping = True
        with self._pool.lock:
            live = [vm for vm in self._pool.vms.values() if not vm.state.complete()]
            connected = len(self._pool.vms)
        self._stopping_now = True
        if self._draining_since is None and not self._member:
            notify("STOPPING=1")
        for vm in live:
            log.warning("%s: server stopping while pages are still missing; its guest "
                        "will freeze on the next missing page", vm.name)
        lifecycle.info("%sstopping: %d VM(s) still connected, %d of them missing pages",
                       self._label, connected, len(live))
        self._admission.join(10)
        self._pool.stop()
        self._caches.close()
        self._close_listener()
        if self._wakes_on_signals:
            signal.set_wakeup_fd(-1)
            self._wakes_on_signals = False
        fds = (self._stop_r, self._stop_w, self._sig_r, self._sig_w)
        self._stop_r = self._stop_w = self._sig_r = self._sig_w = -1
        for fd in fds:
            os.close(fd)

    # --- stats ---------------------------------------------------------------------

    def rows(self) -> list[VmRow]:
        """The VMs that ended (the last 1000) and the live ones."""
        with self._pool.lock:
            return [*self._pool.ended.rows,
                    *(vm.row("active") for vm in self._pool.vms.values())]

    def totals(self) -> Counters:
        """Every session's counters summed: the live ones and all that ever ended."""
        return self.sample().total

    def sample(self, keep_ended_s: float | None = None) -> ServerSample:
        """Read every counter at once: the rows of the live VMs and of those that ended
        within ``keep_ended_s`` (None: the last 1000 ended), and the totals of all."""
        now = time.monotonic()
        pool = self._pool
        with pool.lock:
            live = [vm.row("active") for vm in pool.vms.values()]
            ended = [r for r in pool.ended.rows if keep_ended_s is None
                     or (r.ended_at is not None and now - r.ended_at <= keep_ended_s)]
            total = pool.ended.total.snapshot()
            for r in live:
                total.add(r.counters)
            return ServerSample(
                rows=(*ended, *live), total=total,
                vm_worker_restarts=pool.ended.worker_restarts
                + sum(r.worker_restarts for r in live),
                ms_without_worker=pool.ended.ms_without_worker
                + sum(r.ms_without_worker for r in live),
                sessions_active=len(live), sessions_ended=dict(pool.ended.by_end),
                handshake_failures=self.handshake_failures, refused_peers=self.refused_peers,
                worker_restarts=pool.worker_restarts,
                worker_start_failures=pool.worker_start_failures,
                workers=len(pool.workers), engine=self.engine.value,
                source=pool.source_total())

    def cache_stats(self) -> list[dict[str, object]]:
        """Each page cache: its size, the pages it holds, the VMs using it."""
        return self._caches.stats()

    def stats_doc(self) -> dict[str, object]:
        """The ``--stats-json`` document: totals and one entry per VM."""
        s = self.sample()
        with self._pool.lock:
            workers = [{"index": w.index, "pid": w.pid, "vms": len(w.vms)}
                       for w in self._pool.workers]
        return {
            "source": self.source.describe(),
            "engine": self.engine.value,
            "workers": workers,
            "active_vms": s.sessions_active,
            "sessions_ended": sum(s.sessions_ended.values()),
            "handshake_failures": s.handshake_failures,
            "refused_peers": s.refused_peers,
            "worker_restarts": s.worker_restarts,
            "worker_start_failures": s.worker_start_failures,
            "total": s.total.to_dict(),
            "page_caches": self.cache_stats(),
            "vms": [r.to_dict() for r in s.rows],
        }

    def prometheus(self) -> str:
        """The metrics endpoint's text (Prometheus exposition format 0.0.4)."""
        from pagein.serve.metrics import exposition  # the supervisor's only, when asked
        return exposition(self.sampler())

    def sampler(self) -> Callable[[], ServerSample]:
        """What the metrics endpoint reads at each scrape: :meth:`sample`, keeping the
        rows of VMs ended within ``--metrics-keep-ended``."""
        keep = self.options.metrics_keep_ended_s
        return lambda: self.sample(keep)
