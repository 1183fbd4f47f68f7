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

import contextlib
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

from pagein.errors import HandshakeError, PageinError
from pagein.serve.access import RefusalLog, listen_unix
from pagein.serve.control import ControlError, recv_msg
from pagein.serve.engine import EngineName, choose
from pagein.serve.firecracker import Region, receive_handshake
from pagein.serve.options import BadHandshakePolicy, ServeOptions, VmFailurePolicy
from pagein.serve.pagecache import (
    PageCache,
    is_cache_request,
    mapped_cache,
    read_cache_request,
    reply_cache,
)
from pagein.serve.record import OutputNames
from pagein.serve.served import Served
from pagein.serve.state import VmState
from pagein.serve.stats import Counters, prometheus_text
from pagein.serve.worker import VmServer
from pagein.serve.workers import WORKER_START_S, WorkerFactory, WorkerProc
from pagein.sys.fdpass import PeerCred, kill_through, peer_credentials, peer_pidfd

__all__ = ["BadHandshakePolicy", "Server"]

log = logging.getLogger("pagein.serve")

_KEEP_ENDED = 1000  # ended VMs whose counters stay listed in the stats
_SPAWN_TRIES = 100


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
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _kill(pidfd: int, pid: int) -> None:
    """SIGKILL the VMM behind ``pidfd`` (never a later process that reused ``pid``)."""
    if pidfd < 0:
        log.error("pid %d: no pidfd to signal it through; not killing it", pid)
    elif not kill_through(pidfd):
        log.warning("pid %d: the VMM had already exited; nothing killed (a process that "
                    "reused its PID is left alone)", pid)


@dataclass(frozen=True, slots=True)
class _Row:
    """One VM in the stats: its counters and how its serving went."""

    peer_pid: int
    counters: Counters
    state: str  # "active", or how the session ended
    engine: str
    worker_restarts: int
    ms_without_worker: float
    worker_pid: int | None

    def to_dict(self) -> dict[str, object]:
        return {"peer_pid": self.peer_pid, "state": self.state, "engine": self.engine,
                "worker_restarts": self.worker_restarts,
                "ms_without_worker": self.ms_without_worker, "worker_pid": self.worker_pid,
                **self.counters.to_dict()}


def _row(vm: _Vm, state: str) -> _Row:
    down = vm.down_s + (time.monotonic() - vm.down_since if vm.down_since is not None else 0.0)
    return _Row(vm.peer.pid, vm.state.counters.snapshot(), state, vm.engine, vm.restarts,
                round(down * 1000, 3), None if vm.worker is None else vm.worker.pid)


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

    def __init__(self, served: Served) -> None:
        self.options = options = served.options
        self.source = served.source
        self.engine, why = choose(options.engine)
        if why is not None:
            log.warning("engine: python (%s)", why)
        self._lock = threading.Lock()
        self._vms: dict[int, _Vm] = {}
        self._ids = itertools.count(1)
        self._ended: list[_Row] = []
        self._names = OutputNames()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wakes_on_signals = False
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
        self._sessions_ended = 0
        self._procs: list[WorkerProc] = []
        self._workers: list[WorkerProc | _InProcess] = []
        self._factory: WorkerFactory | None = None
        self._check_path(options.socket_path)
        if options.worker_count == 0:
            self._workers = [_InProcess(served, self.engine, self._on_report)]
            self._listener = self._bind(options)
            return
        self._factory = factory = WorkerFactory(options, self.engine)
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
        """Refuse a path that is not a socket or that a running handler listens on."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise PageinError(f"--socket {path} exists and is not a socket: "
                              "remove it or choose another path")
        if _listening(path):
            raise PageinError(f"--socket {path} is in use by another running handler: "
                              "stop it or choose another path")

    @classmethod
    def _bind(cls, options: ServeOptions) -> socket.socket:
        """Listen with the socket's final permissions from the start; a stale socket of
        an earlier run is replaced atomically."""
        cls._check_path(options.socket_path)
        return listen_unix(options.socket_path, options.socket_permissions,
                           options.socket_group)

    # --- running -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept VMMs until :meth:`stop`; then end every session and return."""
        log.info("serving %s (%d bytes) on %s: %s, engine %s, %d worker(s)",
                 self.source.describe(), self.source.size, self.options.socket_path,
                 self.options.strategy.value, self.engine.value, len(self._workers))
        log.info("socket mode %04o; serving %s", self.options.socket_permissions,
                 self._access.describe())
        poller = select.poll()
        for fd in (self._listener.fileno(), self._stop_r, self._sig_r):
            poller.register(fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
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
                    time.sleep(0.05)
                    continue
                peer = self._admit(conn)
                if peer is None:
                    continue
                # The pidfd now, at accept: by the time a bad handshake is judged the
                # peer may be gone and its PID another process's.
                pidfd = peer_pidfd(conn, peer.pid)
                t = threading.Thread(target=self._handle, args=(conn, peer, pidfd),
                                     daemon=True, name="pagein-handshake")
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(t)
                t.start()
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
        self._stopping = True
        with self._lock:
            live = [vm for vm in self._vms.values() if not vm.state.complete()]
        for vm in live:
            log.warning("%s: server stopping while pages are still missing; its guest "
                        "will freeze on the next missing page", vm.name)
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
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.options.socket_path)
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
            self._on_report(doc)
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
                time.sleep(min(1.0, 0.02 * attempt))
        else:
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
        log.error("serving worker %d (pid %d) exited with status %s while serving %d VM(s); "
                  "starting another (their uffds are kept open: their guests wait, never "
                  "read zero pages)", dead.index, dead.pid, code, len(orphans))
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
                log.error("%s: no worker could be started for it; its guest stays frozen",
                          vm.name)
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

    def _on_report(self, doc: dict[str, object]) -> None:
        vm_id = doc.get("vm")
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
            self._ended.append(_row(vm, end))
            del self._ended[:-_KEEP_ENDED]
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
        self.refused_peers += 1
        self._refusals.refused(peer)
        return None

    def _handle(self, conn: socket.socket, peer: PeerCred, pidfd: int) -> None:
        timeout = self.options.handshake_timeout
        try:
            if is_cache_request(conn, timeout):
                self._cache_request(conn, peer, pidfd)
                return
            hs = receive_handshake(conn, self.source.size, timeout)
        except HandshakeError as e:
            self._bad_handshake(conn, peer, pidfd, e)
            return
        except OSError as e:
            log.warning("vm pid=%d: handshake failed: %s", peer.pid, e)
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        try:
            with self._lock:
                caches = list(self._caches.values())
            cache = mapped_cache(peer.pid, hs.regions, caches)
        except HandshakeError as e:
            os.close(hs.uffd_fd)
            self._bad_handshake(conn, peer, pidfd, e)
            return
        try:
            state = VmState.create(hs.regions)
        except (PageinError, OSError) as e:
            log.error("vm pid=%d: cannot start serving: %s; its guest is frozen", peer.pid, e)
            os.close(hs.uffd_fd)
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        vm_id = next(self._ids)
        vm = _Vm(vm_id, peer, f"vm pid={peer.pid}", hs.regions, hs.uffd_fd, conn,
                 state, pidfd, cache=cache)
        o = self.options
        vm.doc = {"op": "serve", "vm": vm.id, "name": vm.name,
                  "regions": [[r.base_address, r.size_bytes, r.offset, r.page_size]
                              for r in vm.regions],
                  "features": int(hs.features), "pending": hs.rest[:4096].hex(),
                  "record": self._names.claim(o.record) if o.record else None,
                  "trace": self._names.claim(o.trace_path) if o.trace_path else None,
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

    def _hand(self, vm: _Vm, w: WorkerProc | _InProcess, *, resume: bool) -> None:
        """Send ``vm`` (its uffd, socket and state) to worker ``w``."""
        with self._lock:
            vm.worker = w
            w.vms.add(vm.id)
            if vm.down_since is not None:
                vm.down_s += time.monotonic() - vm.down_since
                vm.down_since = None
        if resume:
            log.warning("%s: handed to worker %d (restart %d)", vm.name, w.index, vm.restarts)
        try:
            w.send({**vm.doc, "pending": "" if resume else vm.doc["pending"]},
                   [vm.uffd_fd, vm.conn.fileno(), vm.state.fileno(),
                    *(vm.cache.fds() if vm.cache is not None else ())])
        except OSError as e:
            log.error("%s: cannot hand it to worker %d: %s; its guest is frozen", vm.name,
                      w.index, e)

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
        self.handshake_failures += 1
        action = self.options.on_bad_handshake
        if action is BadHandshakePolicy.KILL and peer.pid > 1 and peer.pid != os.getpid():
            log.error("vm pid=%d: %s; killing the VMM (--on-bad-handshake close keeps it "
                      "alive)", peer.pid, e)
            _kill(pidfd, peer.pid)
        else:
            log.error("vm pid=%d: %s; closing the connection", peer.pid, e)
        conn.close()
        if pidfd >= 0:
            os.close(pidfd)

    # --- stats ---------------------------------------------------------------------

    def rows(self) -> list[_Row]:
        """The VMs that ended (the last 1000) and the live ones."""
        with self._lock:
            return [*self._ended, *(_row(vm, "active") for vm in self._vms.values())]

    def totals(self, rows: list[_Row] | None = None) -> Counters:
        total = Counters()
        for r in self.rows() if rows is None else rows:
            total.add(r.counters)
        return total

    def stats_doc(self) -> dict[str, object]:
        """The ``--stats-json`` document: totals and one entry per VM."""
        rows = self.rows()
        with self._lock:
            workers = [{"index": w.index, "pid": w.pid, "vms": len(w.vms)}
                       for w in self._workers]
        return {
            "source": self.source.describe(),
            "engine": self.engine.value,
            "workers": workers,
            "active_vms": sum(1 for r in rows if r.state == "active"),
            "handshake_failures": self.handshake_failures,
            "refused_peers": self.refused_peers,
            "worker_restarts": self.worker_restarts,
            "worker_start_failures": self.worker_start_failures,
            "total": self.totals(rows).to_dict(),
            "page_caches": self.cache_stats(),
            "vms": [r.to_dict() for r in rows],
        }

    def prometheus(self) -> str:
        rows = self.rows()
        text = prometheus_text([(str(r.peer_pid), r.counters) for r in rows],
                               sum(1 for r in rows if r.state == "active"))
        name = "pagein_worker_restarts_total"
        lines = [f"# HELP {name} Serving workers that died while serving the VM.",
                 f"# TYPE {name} counter"]
        lines += [f'{name}{{vm="{r.peer_pid}"}} {r.worker_restarts}' for r in rows]
        name = "pagein_seconds_without_worker_total"
        lines += [f"# HELP {name} Time the VM spent with no worker serving it.",
                  f"# TYPE {name} counter"]
        lines += [f'{name}{{vm="{r.peer_pid}"}} {r.ms_without_worker / 1000:g}' for r in rows]
        name = "pagein_worker_start_failures_total"
        lines += [f"# HELP {name} Serving workers that died or failed while starting.",
                  f"# TYPE {name} counter", f"{name} {self.worker_start_failures}"]
        caches = self.cache_stats()
        for name, key, what in (("pagein_page_cache_bytes", "size_bytes", "Size of the page "
                                 "cache of the snapshot (--share-pages)."),
                                ("pagein_page_cache_present_bytes", "bytes_present", "Bytes "
                                 "of the snapshot held in the page cache."),
                                ("pagein_page_cache_vms", "vms", "VMs using the page cache.")):
            lines += [f"# HELP {name} {what}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{page_size="{c["page_size"]}"}} {c[key]}' for c in caches]
        name = "pagein_refused_peers_total"
        lines += [f"# HELP {name} Connections refused by the allow-list (--allow-uid/gid).",
                  f"# TYPE {name} counter", f"{name} {self.refused_peers}"]
        return text + "\n".join(lines) + "\n"
