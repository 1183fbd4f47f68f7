"""The fault server's supervisor: listen, take each VMM's handshake, hand the VM to a
serving worker, keep what must outlive a worker.

``pagein serve`` is this small supervisor plus serving workers
(:mod:`pagein.serve.worker`, child processes, one per CPU by default). Each connection's
``SO_PEERCRED`` is checked at accept against the allow-list (:mod:`pagein.serve.access`;
a refused peer is closed unread); for each VMM admitted, a short-lived thread reads the
handshake (with a timeout);
a bad handshake costs one log line naming the field and, by default, the VMM's life (as
Firecracker advises: a VMM whose memory nobody serves is frozen forever). A good one
gets a :class:`~pagein.serve.state.VmState` in shared memory and is sent — uffd, socket
and state memfd, over SCM_RIGHTS — to the worker serving the fewest VMs.

The supervisor keeps its own copies of each VM's uffd, socket and state until the
worker says the VM has gone: if every holder of a uffd closed it, the guest would
silently read zero pages, so a dying worker can freeze its guests but never corrupt
them. It reads every VM's counters straight from the shared state for the stats file
and the metrics endpoint, without asking the workers. Nothing one VM does stops the
others.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pagein
from pagein.errors import ConfigError, HandshakeError, PageinError
from pagein.serve.accept import Acceptor, Spare, raise_fd_limit
from pagein.serve.access import RefusalLog, listen_unix
from pagein.serve.control import ControlError, recv_msg
from pagein.serve.engine import EngineName
from pagein.serve.firecracker import (
    Handshake,
    Region,
    receive_handshake,
    uncovered_bytes,
    validate_regions,
)
from pagein.serve.handler import exit_status
from pagein.serve.identity import FileDigests, Identity, Verdict, reply, split_identity
from pagein.serve.logs import LIFECYCLE
from pagein.serve.options import BadHandshakePolicy, ServeOptions, VmFailurePolicy
from pagein.serve.pagecache import (
    PageCache,
    is_cache_request,
    mapped_cache,
    read_cache_request,
    reply_cache,
)
from pagein.serve.ratelog import RateLimitedLog
from pagein.serve.record import OutputNames
from pagein.serve.served import Served
from pagein.serve.session import choose
from pagein.serve.state import VmState
from pagein.serve.stats import Counters, ServerSample, SourceTally, VmRow, write_json
from pagein.serve.worker import VmServer
from pagein.serve.workers import WORKER_START_S, WorkerCannotServe, WorkerFactory, WorkerProc
from pagein.snapshot.source import SourceStats
from pagein.sys.fdpass import PeerCred, kill_through, peer_credentials, peer_pidfd
from pagein.sys.mapping import PAGE_SIZE, hugetlb_pool, hugetlb_raise_hint
from pagein.sys.pagemap import open_peer_pagemap
from pagein.sys.systemd import notify

__all__ = ["BadHandshakePolicy", "Server"]

log = logging.getLogger("pagein.serve")
lifecycle = logging.getLogger(LIFECYCLE)  # start, drain, stop: logged at any level

_KEEP_ENDED = 1000  # ended VMs whose counters stay listed in the stats
_SPAWN_TRIES = 100


def _listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` now.

    Connects and closes without a byte: a server of ours takes that for a probe and
    leaves this process alone (see :meth:`Server._bad_handshake`).
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


@dataclass(slots=True)
class _Vm:
    id: int
    peer: PeerCred
    name: str
    regions: tuple[Region, ...]
    uffd_fd: int
    conn: socket.socket
    state: VmState
    pidfd: int = -1  # the VMM, for signals (PIDs are reused)
    pagemap_fd: int = -1  # the VMM's /proc/PID/pagemap, for hugetlb VMs (see install.py)
    worker: WorkerProc | _InProcess | None = None
    engine: str = ""
    restarts: int = 0  # workers that died serving it
    down_since: float | None = None  # when its worker died (None: one serves it)
    down_s: float = 0.0  # total time without a worker
    doc: dict[str, object] = field(default_factory=dict)  # the serve message
    cache: PageCache | None = None  # --share-pages: the page cache its regions map

    def release(self) -> None:
        os.close(self.uffd_fd)
        self.conn.close()
        self.state.close()
        for fd in (self.pidfd, self.pagemap_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.pagemap_fd = -1


def _kill(pidfd: int, pid: int) -> None:
    """SIGKILL the VMM behind ``pidfd`` (never a later process that reused ``pid``)."""
    if pidfd < 0:
        log.error("pid %d: no pidfd to signal it through; not killing it", pid)
    elif not kill_through(pidfd):
        log.warning("pid %d: the VMM had already exited; nothing killed (a process that "
                    "reused its PID is left alone)", pid)


def _row(vm: _Vm, state: str, ended_at: float | None = None) -> VmRow:
    down = vm.down_s + (time.monotonic() - vm.down_since if vm.down_since is not None else 0.0)
    return VmRow(vm.id, vm.peer.pid, vm.state.counters.snapshot(), state, vm.engine,
                 vm.restarts, round(down * 1000, 3),
                 None if vm.worker is None else vm.worker.pid, ended_at)


class _InProcess:
    """Serve VMs in threads of this process (``--workers 0``): the only way to serve a
    :class:`PageSource` object that no URL names, as a library user may."""

    index = 0
    dedicated = False

    def __init__(self, served: Served, engine: EngineName,
                 report: Callable[[dict[str, object]], None]) -> None:
        self.vms: set[int] = set()
        self.pid = os.getpid()
        self._server = VmServer(served, engine, report)

    def send(self, doc: dict[str, object], fds: list[int] | None = None) -> None:
        if doc.get("op") == "serve":
            # The session closes what it is given; the supervisor keeps its own copies.
            self._server.start_vm(doc, [os.dup(fd) for fd in fds or []])
        elif doc.get("op") == "stop":
            self._server.stop()


class Server:
    """Serve VMs from one page source. Use :meth:`serve_forever` and :meth:`stop`.

    ``served`` is the source opened by the caller (:func:`~pagein.serve.served.open_served`):
    the supervisor checks each handshake against its size and names it in logs; worker
    processes open their own from the options, ``--workers 0`` serves this one.
    """

    def __init__(self, served: Served, *, listener: socket.socket | None = None) -> None:
        self.options = options = served.options
        # A listener systemd bound (socket activation): used as is, never unlinked.
        self._inherited = listener
        self.source = served.source
        self._served = served
        self._source_stats = SourceTally()  # workers' store caches (--workers 0: ours)
        self._digests = FileDigests(served.file_path(), served.source.size,
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
        self._lock = threading.Lock()
        self._vms: dict[int, _Vm] = {}
        self._ids = itertools.count(1)
        self._ended: list[VmRow] = []
        # Every ended session summed, also those no longer in _ended: totals never drop.
        self._ended_total = Counters()
        self._ended_restarts = 0
        self._ended_down_ms = 0.0
        self._ended_by: collections.Counter[str] = collections.Counter()
        self._names = OutputNames()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wakes_on_signals = False
        self._stop_wanted = False
        self._drain_wanted = False
        self._draining_since: float | None = None
        self._stats_wanted = False
        self._state_wanted = False
        self._socket_id: tuple[int, int] | None = None  # (dev, ino) of the socket we bound
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._waiting: list[_Vm] = []  # VMs that connected while no worker was alive
        self._caches: dict[int, PageCache] = {}  # by page size: the snapshot's page caches
        self.handshake_failures = 0
        self.refused_peers = 0  # connections refused by the allow-list
        self._access = options.access
        self._refusals = RefusalLog(self._access)
        self.worker_restarts = 0  # workers that died while serving (each replaced)
        self.worker_start_failures = 0  # workers that died or failed while starting
        self._spawn_error = ""  # why the last _spawn gave up
        self._sessions_ended = 0
        self._procs: list[WorkerProc] = []
        self._workers: list[WorkerProc | _InProcess] = []
        self._factory: WorkerFactory | None = None
        if listener is None:
            self._check_path(options.socket_path)
        before, self.fd_limit = raise_fd_limit()
        if before != self.fd_limit:
            log.info("open-file limit raised from %d to the hard limit %d (RLIMIT_NOFILE; "
                     "about %d VMs at 4 fds each)", before, self.fd_limit, self.fd_limit // 4)
        # Lines a peer can trigger again and again: at most a few per peer (pid) per 10 s.
        self._peer_log = RateLimitedLog(log, lines=5, interval_s=10.0, total_lines=100)
        if options.worker_count == 0:
            self._workers = [_InProcess(served, self.engine, self._on_report)]
            self._listener = self._bind(options)
            return
        self._factory = factory = WorkerFactory(options, self.engine, served.guard.identity)
        # Listen only once every worker is ready: a VMM connects as soon as the socket
        # exists, and its first fault would otherwise wait for the workers to start.
        starting: list[WorkerProc] = []
        try:
            starting = [factory.new(i) for i in range(options.worker_count)]
            for w in starting:  # all start at once; wait for each
                w.wait_ready(WORKER_START_S)
            self._listener = self._bind(options)
        except BaseException:
            for w in starting:
                w.kill()
            factory.close()
            raise
        for w in starting:
            self._adopt(w)
        factory.refill()  # a spare: the VMs of a worker that dies wait milliseconds

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
        acceptor = Acceptor(self._listener, self.fd_limit, lambda: len(self._vms))
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
                    self._accept(acceptor)
        finally:
            self._shutdown()

    def _announce(self) -> None:
        """The start-up line (at the default level) and READY=1 to a service manager."""
        where = (f"{self.options.socket_path} (from systemd)" if self._inherited is not None
                 else self.options.socket_path)
        workers = "in this process" if self.options.worker_count == 0 else \
            f"{len(self._workers)} worker(s)"
        lifecycle.info("pagein %s serving %s (%d bytes) on %s: strategy %s, engine %s, %s",
                       pagein.__version__, self.source.describe(), self.source.size, where,
                       self.options.strategy.value, self.engine.value, workers)
        if self._inherited is None:
            log.info("socket mode %04o; serving %s", self.options.socket_permissions,
                     self._access.describe())
        else:
            log.info("serving %s (the socket's mode and group are the .socket unit's)",
                     self._access.describe())
        notify("READY=1", f"STATUS=serving {self.source.describe()}"[:200])

    def _accept(self, acceptor: Acceptor) -> None:
        if (got := acceptor.accept()) is None:
            return
        conn, spare = got
        peer = self._admit(conn)
        if peer is None:
            spare.close()
            return
        # The pidfd now, at accept: by the time a bad handshake is judged the
        # peer may be gone and its PID another process's.
        spare.take()
        pidfd = peer_pidfd(conn, peer.pid)
        t = threading.Thread(target=self._handle, args=(conn, peer, pidfd, spare),
                             daemon=True, name="pagein-handshake")
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(t)
        t.start()

    # --- draining (SIGTERM) -------------------------------------------------------------

    def _begin_drain(self, poller: select.poll, acceptor: Acceptor) -> None:
        """Stop accepting: close the listener (and remove our socket file) at once, so a
        new VMM's connect fails instead of waiting in a backlog nobody reads."""
        self._draining_since = time.monotonic()
        with contextlib.suppress(KeyError, ValueError):
            poller.unregister(acceptor.fileno())
        self._close_listener()
        with self._lock:
            live = len(self._vms)
        notify("STOPPING=1", f"STATUS=draining {live} VM(s)")
        lifecycle.info("SIGTERM: no longer accepting; draining %d VM(s) for up to %g s "
                       "(--drain-timeout; a second SIGTERM stops at once)", live,
                       self.options.drain_timeout)

    def _drained(self) -> bool:
        """Whether the drain is over: every VM gone or complete, or the deadline passed
        (then each VM still missing pages is named)."""
        for t in self._threads:  # handshakes under way count as VMs attaching
            if t.is_alive():
                return self._past_drain_deadline()
        with self._lock:
            waiting = [vm for vm in self._vms.values() if not vm.state.complete()]
        if not waiting:
            lifecycle.info("drained: every VM has gone or has all its pages")
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
        lifecycle.info("SIGHUP: %d VM(s) connected (%s), %d ended, %d worker(s), %d faults "
                       "served, %d handshake failure(s), %d refused peer(s)", len(live),
                       ", ".join(f"vm pid={r.peer_pid}" for r in live[:20])
                       + (", ..." if len(live) > 20 else "") if live else "none",
                       len(rows) - len(live), len(self._workers), total.faults,
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

    def request_stop_now(self) -> None:
        """Ask :meth:`serve_forever` to stop without draining (for SIGINT: sets a flag)."""
        self._drain_wanted = self._stop_wanted = True

    def request_state(self) -> None:
        """Ask :meth:`serve_forever` to log its state and write the stats (SIGHUP)."""
        self._state_wanted = self._stats_wanted = True

    def request_stats(self) -> None:
        """Ask :meth:`serve_forever` to write ``--stats-json`` (for SIGUSR1: sets a flag)."""
        self._stats_wanted = True

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
        self._stopping = True
        with self._lock:
            live = [vm for vm in self._vms.values() if not vm.state.complete()]
        if self._draining_since is None:
            notify("STOPPING=1")
        for vm in live:
            log.warning("%s: server stopping while pages are still missing; its guest "
                        "will freeze on the next missing page", vm.name)
        lifecycle.info("stopping: %d VM(s) still connected, %d of them missing pages",
                       len(self._vms), len(live))
        for t in list(self._threads):
            t.join(timeout=10)
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(OSError):
                w.send({"op": "stop"})
        for w in self._procs:
            if not w.wait(10):
                log.error("serving worker %d did not stop; killing it", w.index)
            w.kill()
        if self._factory is not None:
            self._factory.close()
        with self._lock:
            rest = list(self._vms)
        for vm_id in rest:
            self._retire(vm_id, "server stopping")
        with self._lock:
            caches, self._caches = list(self._caches.values()), {}
        for c in caches:
            c.close()
        self._close_listener()
        if self._wakes_on_signals:
            signal.set_wakeup_fd(-1)
            self._wakes_on_signals = False
        fds = (self._stop_r, self._stop_w, self._sig_r, self._sig_w)
        self._stop_r = self._stop_w = self._sig_r = self._sig_w = -1
        for fd in fds:
            os.close(fd)

    # --- workers ---------------------------------------------------------------------

    def _watch_worker(self, w: WorkerProc) -> None:
        """Read a worker's reports until it exits."""
        while True:
            try:
                got = recv_msg(w.ctl)
            except (ControlError, OSError, ValueError) as e:
                log.error("serving worker %d: control channel failed: %s", w.index, e)
                got = None
            if got is None:
                break
            doc, fds = got
            for fd in fds:
                os.close(fd)
            self._on_report(doc, w.pid)
        with self._lock:
            self._source_stats.retire(w.pid)
        if self._stopping:
            return
        if w.retiring:
            if not w.wait(5):
                log.error("serving worker %d did not stop; killing it", w.index)
            w.kill()
            return
        code = w.kill()
        self._replace(w, code)

    # --- a worker died -------------------------------------------------------------------

    def _spawn(self, index: int, *, dedicated: bool = False) -> WorkerProc | None:
        """Start a worker, wait until it is ready and watch it; retried (a worker can die
        while it starts) until the server stops or it failed ``_SPAWN_TRIES`` times."""
        refused = 0
        for attempt in range(_SPAWN_TRIES):
            if self._stopping:
                return None
            assert self._factory is not None
            try:
                w = self._factory.ready(index)
                break
            except (PageinError, OSError) as e:
                with self._lock:
                    self.worker_start_failures += 1
                log.error("cannot start a serving worker (try %d): %s", attempt + 1, e)
                if isinstance(e, WorkerCannotServe):
                    refused += 1
                    if refused >= 3:  # its source cannot be served: no retry will help
                        self._spawn_error = str(e)
                        return None
                time.sleep(min(1.0, 0.02 * attempt))
        else:
            self._spawn_error = "workers kept dying as they started"
            return None
        w.dedicated = dedicated
        self._adopt(w)
        return w

    def _adopt(self, w: WorkerProc) -> None:
        """Make a ready worker part of the pool: watch it, give it the VMs waiting."""
        with self._lock:
            self._procs.append(w)
            self._workers.append(w)
            waiting: list[_Vm] = []
            if not w.dedicated:
                waiting, self._waiting = self._waiting, []
        threading.Thread(target=self._watch_worker, args=(w,), daemon=True,
                         name=f"pagein-worker-{w.index}").start()
        for vm in waiting:  # VMs that connected while no worker was alive
            self._hand(vm, w, resume=False)

    def _replace(self, dead: WorkerProc, code: int | None) -> None:
        """Start a worker in place of ``dead`` and hand it the dead one's VMs (see
        :mod:`pagein.serve.recovery`): they go on; only a VM that keeps being served by
        dying workers fails, and one caught in a second crash is served alone."""
        now = time.monotonic()
        with self._lock:
            self._procs = [w for w in self._procs if w is not dead]
            self._workers = [w for w in self._workers if w is not dead]
            orphans = [self._vms[i] for i in sorted(dead.vms) if i in self._vms]
            dead.vms.clear()
            self.worker_restarts += 1
            next_index = max([w.index for w in self._procs] + [dead.index]) + 1
        for vm in orphans:
            vm.restarts += 1
            vm.down_since = now
            vm.worker = None
        log.error("serving worker %d (pid %d) exited with %s while serving %d VM(s); "
                  "starting another (their uffds are kept open: their guests wait, never "
                  "read zero pages)", dead.index, dead.pid,
                  "an unknown status" if code is None else exit_status(code), len(orphans))
        limit = self.options.max_restarts
        for vm in [v for v in orphans if v.restarts > limit]:
            self._fail_vm(vm, f"{vm.restarts} workers died serving it")
        rest = [v for v in orphans if v.restarts <= limit]
        # A suspect (a VM caught in a second crash) goes to a worker of its own, so that a
        # third crash there names it alone; a VM alone on the dead worker already is.
        suspects = [v for v in rest if v.restarts >= 2] if len(rest) > 1 else []
        others = [v for v in rest if v not in suspects]
        home = None
        if not dead.dedicated or others:  # the pool keeps its size; a dedicated one ends
            home = self._spawn(dead.index, dedicated=dead.dedicated)
        for vm in rest:
            target = home
            if vm in suspects:
                target = self._spawn(next_index, dedicated=True)
                next_index += 1
            if target is None:
                log.error("%s: no worker could be started for it (%s); serving failed, its "
                          "guest stays frozen", vm.name, self._spawn_error[:300])
                self._vm_ended(vm.id, "failed")
                continue
            self._hand(vm, target, resume=True)

    def _fail_vm(self, vm: _Vm, why: str) -> None:
        kill = self.options.on_vm_failure is VmFailurePolicy.KILL
        log.error("%s: serving failed for good (%s); %s", vm.name, why,
                  "killing its VMM (--on-vm-failure freeze leaves it)" if kill
                  else "its guest stays frozen (--on-vm-failure freeze)")
        if kill:
            _kill(vm.pidfd, vm.peer.pid)
        self._vm_ended(vm.id, "failed")

    def _on_report(self, doc: dict[str, object], worker: int | None = None) -> None:
        vm_id = doc.get("vm")
        if doc.get("op") == "source-stats" and worker is not None:
            raw = doc.get("stats")
            try:
                if not isinstance(raw, dict):
                    raise ValueError("not an object")
                stats = SourceStats.from_doc(raw)
            except ValueError as e:
                log.error("serving worker pid %d sent bad source stats: %s", worker, e)
                return
            with self._lock:
                self._source_stats.update(worker, stats)
            return
        if doc.get("op") == "started" and isinstance(vm_id, int):
            with self._lock:
                if vm_id in self._vms:
                    self._vms[vm_id].engine = str(doc.get("engine", ""))
        elif doc.get("op") == "ended" and isinstance(vm_id, int):
            self._vm_ended(vm_id, str(doc.get("end", "failed")))

    def _vm_ended(self, vm_id: int, end: str) -> None:
        done = self._retire(vm_id, end)
        limit = self.options.exit_after
        if done is not None and limit is not None and done >= limit:
            self.stop()

    def _retire(self, vm_id: int, end: str) -> int | None:
        """Keep the final counters of a VM that ended, release its fds and state; return
        how many VMs have ended (None when it had already been retired)."""
        with self._lock:
            vm = self._vms.pop(vm_id, None)
            if vm is None:
                return None
            w = vm.worker
            if w is not None:
                w.vms.discard(vm_id)
            if isinstance(w, WorkerProc) and w.dedicated and not w.vms and not self._stopping:
                # A worker of its own for a suspect VM: it goes with the VM.
                w.retiring = True
                self._procs = [x for x in self._procs if x is not w]
                self._workers = [x for x in self._workers if x is not w]
                with contextlib.suppress(OSError):
                    w.send({"op": "stop"})
            if vm.cache is not None:
                vm.cache.users -= 1
                vm.cache.used_at = time.monotonic()
                self._schedule_cache_drop()
            row = _row(vm, end, time.monotonic())
            self._ended.append(row)
            del self._ended[:-_KEEP_ENDED]
            self._ended_total.add(row.counters)
            self._ended_restarts += row.worker_restarts
            self._ended_down_ms += row.ms_without_worker
            self._ended_by[end] += 1
            self._sessions_ended += 1
            done = self._sessions_ended
        vm.release()
        return done

    # --- one connection ------------------------------------------------------------

    def _admit(self, conn: socket.socket) -> PeerCred | None:
        """The peer of a new connection if the allow-list serves it; else close it unread.

        Checked in the accept loop (one ``getsockopt``), so a refused peer costs no
        thread, no handshake read, no signal and no bad-handshake count.
        """
        try:
            peer = peer_credentials(conn)
        except OSError as e:
            log.warning("cannot read SO_PEERCRED of a new connection: %s", e)
            conn.close()
            return None
        if self._access.permits(peer):
            return peer
        conn.close()
        with self._lock:
            self.refused_peers += 1
        self._refusals.refused(peer)
        return None

    def _handle(self, conn: socket.socket, peer: PeerCred, pidfd: int, spare: Spare) -> None:
        try:
            self._take_vm(conn, peer, pidfd, spare)
        finally:
            spare.close()

    def _take_vm(self, conn: socket.socket, peer: PeerCred, pidfd: int, spare: Spare) -> None:
        """Read one VMM's handshake and hand the VM to a worker (or refuse it).

        ``spare`` holds an fd for each of the fds this opens (see
        :mod:`pagein.serve.accept`); each is freed just before its step.
        """
        spare.take()
        timeout = self.options.handshake_timeout
        deadline = time.monotonic() + timeout  # one handshake timeout for both steps
        try:
            if is_cache_request(conn, timeout):
                self._cache_request(conn, peer, pidfd)
                return
            hs = receive_handshake(conn, None, max(0.001, deadline - time.monotonic()))
        except HandshakeError as e:
            self._bad_handshake(conn, peer, pidfd, e)
            return
        except OSError as e:
            self._handshake_lost(conn, peer, pidfd, e)
            return
        checked = self._check(conn, peer, pidfd, hs)
        if checked is None:
            os.close(hs.uffd_fd)
            return
        hs = checked
        spare.take()
        try:
            with self._lock:
                caches = list(self._caches.values())
            cache = mapped_cache(peer.pid, hs.regions, caches)
        except HandshakeError as e:
            os.close(hs.uffd_fd)
            e.sent_uffd = True  # a VMM whose uffd was here: --on-bad-handshake applies
            self._bad_handshake(conn, peer, pidfd, e)
            return
        try:
            state = VmState.create(hs.regions)
        except (PageinError, OSError) as e:
            self._peer_log.log(logging.ERROR, peer.pid, f"vm pid={peer.pid}",
                               "cannot start serving: %s; closing the connection", e)
            os.close(hs.uffd_fd)
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        vm_id = next(self._ids)
        vm = _Vm(vm_id, peer, f"vm pid={peer.pid}", hs.regions, hs.uffd_fd, conn,
                 state, pidfd, cache=cache)
        if any(r.page_size != PAGE_SIZE for r in vm.regions):
            self._check_hugetlb(vm)
        o = self.options
        vm.doc = {"op": "serve", "vm": vm.id, "name": vm.name,
                  "regions": [[r.base_address, r.size_bytes, r.offset, r.page_size]
                              for r in vm.regions],
                  "features": int(hs.features), "pending": hs.rest[:4096].hex(),
                  "record": self._names.claim(o.record) if o.record else None,
                  "trace": self._names.claim(o.trace_path) if o.trace_path else None,
                  "pagemap": vm.pagemap_fd >= 0,
                  "cache": None if cache is None else [cache.size_bytes, cache.page_size]}
        with self._lock:
            self._vms[vm.id] = vm
            if cache is not None:
                cache.users += 1
                cache.used_at = time.monotonic()
            pool = [w for w in self._workers if not w.dedicated]
            if not pool:  # between a worker's death and its successor
                vm.down_since = time.monotonic()
                self._waiting.append(vm)
                log.warning("%s: waiting for a serving worker to start", vm.name)
                return
            w = min(pool, key=lambda w: (len(w.vms), w.index))
        log.info("%s: serving %d regions (%d bytes) with %s on worker %d%s", vm.name,
                 len(vm.regions), sum(r.size_bytes for r in vm.regions), o.strategy.value,
                 w.index, "" if cache is None else ", sharing the page cache")
        self._hand(vm, w, resume=False)

    def _check(self, conn: socket.socket, peer: PeerCred, pidfd: int,
               hs: Handshake) -> Handshake | None:
        """Check a handshake against the served file before any page is served; None
        when refused (the connection and pidfd are then dealt with, the uffd is not).

        pagein's identity line (:mod:`pagein.serve.identity`) is judged first: a VMM
        that sent one is told why it is refused and closed, not killed. Without one (a
        Firecracker VMM) the regions are all there is: a bad one is a bad handshake.
        """
        identity: Identity | None = None
        try:
            deadline = time.monotonic() + self.options.handshake_timeout
            identity, rest = split_identity(conn, hs.rest, deadline)
            verdict = Verdict(())
            if identity is not None:
                verdict = self._digests.check(identity)
            if verdict.error is None:
                validate_regions(hs.regions, self.source.size)
        except HandshakeError as e:
            if identity is None and not e.field.startswith("identity"):
                e.sent_uffd = True  # a VMM whose uffd is here: --on-bad-handshake applies
                self._bad_handshake(conn, peer, pidfd, e)
                return None
            verdict = Verdict((), str(e))
        except OSError as e:
            self._handshake_lost(conn, peer, pidfd, e)
            return None
        if verdict.error is not None:
            self.handshake_failures += 1
            self._peer_log.log(logging.ERROR, peer.pid, f"vm pid={peer.pid}",
                               "refused: %s; told the VMM and closed the connection (no "
                               "page was served)", verdict.error)
            with contextlib.suppress(OSError):
                conn.sendall(reply(verdict))
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return None
        if identity is None and (short := uncovered_bytes(hs.regions, self.source.size)):
            self._peer_log.log(logging.WARNING, peer.pid, f"vm pid={peer.pid}",
                               "its regions cover %d bytes of the %d-byte memory file (%d "
                               "bytes never served): a Firecracker snapshot's regions cover "
                               "its memory file exactly; is %s the snapshot it restores?",
                               self.source.size - short, self.source.size, short,
                               self.source.describe())
        if identity is not None:
            try:
                conn.sendall(reply(verdict))
            except OSError as e:
                self._handshake_lost(conn, peer, pidfd, e)
                return None
        return Handshake(hs.regions, hs.uffd_fd, rest, hs.features)

    def _handshake_lost(self, conn: socket.socket, peer: PeerCred, pidfd: int,
                        e: OSError) -> None:
        self._peer_log.log(logging.WARNING, peer.pid, f"vm pid={peer.pid}",
                           "handshake failed: %s; closing the connection", e)
        conn.close()
        if pidfd >= 0:
            os.close(pidfd)

    def _hand(self, vm: _Vm, w: WorkerProc | _InProcess, *, resume: bool) -> None:
        """Send ``vm`` (its uffd, socket and state) to worker ``w``.

        ``w`` may have died since it was chosen. The VM joins ``w.vms`` only while ``w``
        is in the pool, under the lock that :meth:`_replace` takes to remove a dead
        worker and collect its VMs: so either ``_replace`` will find the VM there, or
        ``w`` is gone already and a live worker is chosen (or, with none alive, the VM
        waits for the next one adopted). A send that fails therefore needs nothing
        more: the worker is dead, and its successor gets the VM.
        """
        with self._lock:
            if isinstance(w, WorkerProc) and w not in self._workers:
                pool = [x for x in self._workers if not x.dedicated]
                if not pool:
                    if vm.down_since is None:
                        vm.down_since = time.monotonic()
                    self._waiting.append(vm)
                    log.warning("%s: its worker died before taking it; waiting for the next "
                                "one", vm.name)
                    return
                w = min(pool, key=lambda x: (len(x.vms), x.index))
            vm.worker = w
            w.vms.add(vm.id)
            if vm.down_since is not None:
                vm.down_s += time.monotonic() - vm.down_since
                vm.down_since = None
        if resume:
            log.warning("%s: handed to worker %d (restart %d)", vm.name, w.index, vm.restarts)
        try:
            fds = [vm.uffd_fd, vm.conn.fileno(), vm.state.fileno()]
            w.send({**vm.doc, "pending": "" if resume else vm.doc["pending"]},
                   fds + ([vm.pagemap_fd] if vm.pagemap_fd >= 0 else [])
                   + list(vm.cache.fds() if vm.cache is not None else ()))
        except (OSError, ValueError) as e:  # ValueError: our end already closed
            log.warning("%s: worker %d went away as the VM was handed to it (%s); its "
                        "successor takes the VM", vm.name, w.index, e)

    def _check_hugetlb(self, vm: _Vm) -> None:
        """For a VM with huge-page regions: open its pagemap (the engines check a hugetlb
        EEXIST in it: an empty pool says EEXIST too) and warn now, with the fix, when the
        pool cannot hold its pages (a VMM maps them MAP_NORESERVE: nothing is reserved,
        every fill takes a page from the pool)."""
        vm.pagemap_fd = open_peer_pagemap(vm.peer.pid, vm.pidfd)
        if vm.pagemap_fd < 0:
            log.warning("%s: cannot open /proc/%d/pagemap; an empty hugetlb pool will not "
                        "be told from a racing fill", vm.name, vm.peer.pid)
        for size in sorted({r.page_size for r in vm.regions} - {PAGE_SIZE}):
            need = sum(r.size_bytes for r in vm.regions if r.page_size == size) // size
            pool = hugetlb_pool(size)
            if pool is not None and pool[0] + pool[1] < need:
                log.warning("%s: its %d KiB-page regions need %d pages but the pool can give "
                            "%d now: fills past that fail unless the pool grows; %s", vm.name,
                            size // 1024, need, pool[0] + pool[1], hugetlb_raise_hint(size))

    # --- the page cache (--share-pages) -------------------------------------------------

    def _cache_request(self, conn: socket.socket, peer: PeerCred, pidfd: int) -> None:
        """Hand the page cache of the page size asked for (made on first use) to a VMM
        that will map its guest memory from it; then close (see pagein.serve.pagecache)."""
        try:
            page_size = read_cache_request(conn, self.options.handshake_timeout)
            with self._lock:
                cache = self._caches.get(page_size)
                if cache is None:
                    cache = PageCache(self.source.size, page_size)
                    self._caches[page_size] = cache
                    log.info("page cache of %s made: %d bytes in %d-byte pages",
                             self.source.describe(), cache.size_bytes, page_size)
                cache.used_at = time.monotonic()
            reply_cache(conn, cache)
        except HandshakeError as e:
            log.error("pid %d: %s; closing the connection", peer.pid, e)
            with contextlib.suppress(OSError):
                reply_cache(conn, None, str(e))
        except (PageinError, OSError, ValueError) as e:
            log.error("pid %d: cannot give it a page cache: %s", peer.pid, e)
            with contextlib.suppress(OSError):
                reply_cache(conn, None, str(e))
        finally:
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)

    def _schedule_cache_drop(self) -> None:
        """Drop caches nobody used for ``--page-cache-keep`` seconds, that long from now."""
        t = threading.Timer(self.options.page_cache_keep + 0.01, self._drop_idle_caches)
        t.daemon = True
        t.start()

    def _drop_idle_caches(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [ps for ps, c in self._caches.items()
                    if c.users == 0 and now - c.used_at >= self.options.page_cache_keep]
            dropped = [self._caches.pop(ps) for ps in idle]
        for c in dropped:
            log.info("page cache of %d-byte pages dropped (%d bytes held; no VM used it for "
                     "%g s)", c.page_size, c.present.count * c.page_size,
                     self.options.page_cache_keep)
            c.close()

    def cache_stats(self) -> list[dict[str, object]]:
        """Each page cache: its size, the pages it holds, the VMs using it."""
        with self._lock:
            return [c.stats() for c in self._caches.values()]

    def _bad_handshake(self, conn: socket.socket, peer: PeerCred, pidfd: int,
                       e: HandshakeError) -> None:
        """Log a failed handshake and apply ``--on-bad-handshake`` to a peer that holds a uffd.

        Only a peer that sent a userfaultfd is a VMM whose guest would stay frozen: the
        kill policy is for it alone. A peer that sent nothing (a health probe, a
        monitoring ``connect()``, a second ``pagein serve`` checking whether the socket is
        in use) or bytes without a uffd is closed and left alone: killing it would kill
        whatever happens to connect.
        """
        where = f"vm pid={peer.pid}"
        try:
            if not e.sent_uffd and e.received_bytes == 0:
                log.debug("%s: connection closed without a handshake (nothing sent: a "
                          "probe or a socket check); closed", where)
                return
            with self._lock:  # handshake threads run at once
                self.handshake_failures += 1
            # A peer may reconnect with bad handshakes forever: its lines are rate-limited
            # (the values it sent are already cut short by HandshakeError).
            if not e.sent_uffd:
                self._peer_log.log(logging.WARNING, peer.pid, where,
                                   "%s; closing the connection (it sent no userfaultfd, so "
                                   "no guest waits on it: not killed)", e)
            elif (self.options.on_bad_handshake is BadHandshakePolicy.KILL and peer.pid > 1
                    and peer.pid != os.getpid()):
                self._peer_log.log(logging.ERROR, peer.pid, where, "%s; killing the VMM "
                                   "(--on-bad-handshake close keeps it alive)", e)
                _kill(pidfd, peer.pid)
            else:
                self._peer_log.log(logging.ERROR, peer.pid, where,
                                   "%s; closing the connection", e)
        finally:
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)

    # --- stats ---------------------------------------------------------------------

    def rows(self) -> list[VmRow]:
        """The VMs that ended (the last 1000) and the live ones."""
        with self._lock:
            return [*self._ended, *(_row(vm, "active") for vm in self._vms.values())]

    def totals(self) -> Counters:
        """Every session's counters summed: the live ones and all that ever ended."""
        return self.sample().total

    def sample(self, keep_ended_s: float | None = None) -> ServerSample:
        """Read every counter at once: the rows of the live VMs and of those that ended
        within ``keep_ended_s`` (None: the last 1000 ended), and the totals of all."""
        now = time.monotonic()
        with self._lock:
            live = [_row(vm, "active") for vm in self._vms.values()]
            ended = [r for r in self._ended if keep_ended_s is None
                     or (r.ended_at is not None and now - r.ended_at <= keep_ended_s)]
            total = self._ended_total.snapshot()
            for r in live:
                total.add(r.counters)
            return ServerSample(
                rows=(*ended, *live), total=total,
                vm_worker_restarts=self._ended_restarts + sum(r.worker_restarts for r in live),
                ms_without_worker=self._ended_down_ms + sum(r.ms_without_worker for r in live),
                sessions_active=len(live), sessions_ended=dict(self._ended_by),
                handshake_failures=self.handshake_failures, refused_peers=self.refused_peers,
                worker_restarts=self.worker_restarts,
                worker_start_failures=self.worker_start_failures,
                workers=len(self._workers), engine=self.engine.value,
                source=(self._served.source_stats() if self.options.worker_count == 0
                        else self._source_stats.total()))

    def stats_doc(self) -> dict[str, object]:
        """The ``--stats-json`` document: totals and one entry per VM."""
        s = self.sample()
        with self._lock:
            workers = [{"index": w.index, "pid": w.pid, "vms": len(w.vms)}
                       for w in self._workers]
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
        return exposition(self)
