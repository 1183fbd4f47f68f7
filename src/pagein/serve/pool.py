"""The serving workers of ``pagein serve`` and the VMs they serve: who serves which VM,
and what happens when a worker dies.

:mod:`pagein.serve.admit` hands each admitted VM to :meth:`Pool.take`, which gives it to
the worker serving the fewest VMs (:mod:`pagein.serve.workers` holds the processes). The
pool keeps its own copies of each VM's uffd, socket and state until the worker says the
VM has gone: if every holder of a uffd closed it, the guest would silently read zero
pages, so a dying worker can freeze its guests but never corrupt them.

When a worker dies, :meth:`Pool._replace` starts another and hands it the dead one's
VMs (see :mod:`pagein.serve.recovery`): they go on; only a VM that keeps being served by
dying workers fails, and one caught in a second crash is served by a worker of its own
(a dedicated worker, which ends with its VM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagein.errors import PageinError
from pagein.serve.control import ControlError, recv_msg
from pagein.serve.engine import EngineName
from pagein.serve.firecracker import Region
from pagein.serve.handler import exit_status
from pagein.serve.options import ServeOptions, VmFailurePolicy
from pagein.serve.pagecache import PageCache, PageCaches
from pagein.serve.served import Served
from pagein.serve.state import VmState
from pagein.serve.stats import EndedTally, SourceTally, VmRow
from pagein.serve.worker import VmServer
from pagein.serve.workers import (
    WORKER_START_S,
    WorkerCannotServe,
    WorkerFactory,
    WorkerProc,
    Zygote,
)
from pagein.snapshot.source import SourceStats
from pagein.sys.fdpass import PeerCred, kill_through

__all__ = ["AttachedVm", "InProcess", "Pool", "kill_vmm"]

log = logging.getLogger("pagein.serve")

_SPAWN_TRIES = 100


@dataclass(slots=True)
class AttachedVm:
    """A VM the server holds: its VMM's fds (the supervisor's copies) and how its
    serving goes."""

    id: int
    peer: PeerCred
    name: str
    regions: tuple[Region, ...]
    uffd_fd: int
    conn: socket.socket
    state: VmState
    pidfd: int = -1  # the VMM, for signals (PIDs are reused)
    pagemap_fd: int = -1  # the VMM's /proc/PID/pagemap, for hugetlb VMs (see install.py)
    worker: WorkerProc | InProcess | None = None
    engine: str = ""
    restarts: int = 0  # workers that died serving it
    down_since: float | None = None  # when its worker died (None: one serves it)
    down_s: float = 0.0  # total time without a worker
    doc: dict[str, object] = field(default_factory=dict)  # the serve message
    cache: PageCache | None = None  # --share-pages: the page cache its regions map

    def fds(self) -> dict[str, int]:
        """The fds a worker is sent, by the names the serve message gives them."""
        fds = {"uffd": self.uffd_fd, "socket": self.conn.fileno(),
               "state": self.state.fileno()}
        if self.pagemap_fd >= 0:
            fds["pagemap"] = self.pagemap_fd
        if self.cache is not None:
            fds["cache-data"], fds["cache-present"] = self.cache.fds()
        return fds

    def row(self, state: str, ended_at: float | None = None) -> VmRow:
        """Its line in the stats."""
        down = self.down_s + (time.monotonic() - self.down_since
                              if self.down_since is not None else 0.0)
        return VmRow(self.id, self.peer.pid, self.state.counters.snapshot(), state,
                     self.engine, self.restarts, round(down * 1000, 3),
                     None if self.worker is None else self.worker.pid, ended_at)

    def release(self) -> None:
        os.close(self.uffd_fd)
        self.conn.close()
        self.state.close()
        for fd in (self.pidfd, self.pagemap_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.pagemap_fd = -1


def kill_vmm(pidfd: int, pid: int) -> None:
    """SIGKILL the VMM behind ``pidfd`` (never a later process that reused ``pid``)."""
    if pidfd < 0:
        log.error("pid %d: no pidfd to signal it through; not killing it", pid)
    elif not kill_through(pidfd):
        log.warning("pid %d: the VMM had already exited; nothing killed (a process that "
                    "reused its PID is left alone)", pid)


class InProcess:
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
        elif doc.get("op") == "populate":
            self._server.populate_all()


class Pool:
    """The workers and the VMs they serve. :meth:`start`, then :meth:`take` each VM;
    :meth:`stop` at the end.

    ``on_ended`` is called with the number of sessions ended so far, each time one ends.
    ``lock`` guards ``vms``, the workers and the counters; readers of the stats take it.
    """

    def __init__(self, served: Served, engine: EngineName, caches: PageCaches,
                 on_ended: Callable[[int], None], zygote: Zygote | None = None) -> None:
        self.options: ServeOptions = served.options
        self._served = served
        self._engine = engine
        self._caches = caches
        self._on_ended = on_ended
        self._zygote = zygote  # shared by the servers of a fleet (None: a factory's own)
        self.lock = threading.Lock()
        self.vms: dict[int, AttachedVm] = {}
        self.ended = EndedTally()
        self.source_stats = SourceTally()  # workers' store caches (--workers 0: ours)
        self.workers: list[WorkerProc | InProcess] = []
        self._procs: list[WorkerProc] = []
        self._factory: WorkerFactory | None = None
        self._waiting: list[AttachedVm] = []  # VMs that connected while no worker was alive
        self.stopping = False
        self.populating = False  # draining: every VM fills its missing pages now
        self.worker_restarts = 0  # workers that died while serving (each replaced)
        self.worker_start_failures = 0  # workers that died or failed while starting
        self._spawn_error = ""  # why the last _spawn gave up

    def start(self, bind: Callable[[], None]) -> None:
        """Start the workers, then call ``bind``: a VMM connects as soon as the socket
        exists, and its first fault would otherwise wait for the workers to start."""
        if self.options.worker_count == 0:
            self.workers = [InProcess(self._served, self._engine, self.on_report)]
            bind()
            return
        self._factory = factory = WorkerFactory(self.options, self._engine,
                                                self._served.guard.identity, self._zygote)
        starting: list[WorkerProc] = []
        try:
            starting = [factory.new(i) for i in range(self.options.worker_count)]
            for w in starting:  # all start at once; wait for each
                w.wait_ready(WORKER_START_S)
            bind()
        except BaseException:
            for w in starting:
                w.kill()
            factory.close()
            raise
        for w in starting:
            self._adopt(w)
        factory.refill()  # a spare: the VMs of a worker that dies wait milliseconds

    def take(self, vm: AttachedVm) -> None:
        """Serve ``vm``: give it to the worker serving the fewest VMs (or, between a
        worker's death and its successor, keep it waiting for the next one)."""
        if vm.cache is not None:
            self._caches.acquire(vm.cache)
        with self.lock:
            self.vms[vm.id] = vm
            pool = [w for w in self.workers if not w.dedicated]
            if not pool:  # between a worker's death and its successor
                vm.down_since = time.monotonic()
                self._waiting.append(vm)
                log.warning("%s: waiting for a serving worker to start", vm.name)
                return
            w = min(pool, key=lambda w: (len(w.vms), w.index))
        log.info("%s: serving %d regions (%d bytes) with %s on worker %d%s", vm.name,
                 len(vm.regions), sum(r.size_bytes for r in vm.regions),
                 self.options.strategy.value, w.index,
                 "" if vm.cache is None else ", sharing the page cache")
        self._hand(vm, w, resume=False)

    def stop(self) -> None:
        """Stop every worker and end every session (the server is stopping)."""
        self.stopping = True
        with self.lock:
            workers = list(self.workers)
        for w in workers:
            with contextlib.suppress(OSError):
                w.send({"op": "stop"})
        for p in self._procs:
            if not p.wait(10):
                log.error("serving worker %d did not stop; killing it", p.index)
            p.kill()
        if self._factory is not None:
            self._factory.close()
        with self.lock:
            rest = list(self.vms)
        for vm_id in rest:
            self.retire(vm_id, "server stopping")

    def populate_all(self) -> None:
        """The server drains: every VM, and each handed to a worker from now on (a new
        worker's too), fills all its missing pages in the background, so that it
        completes within the drain deadline instead of waiting for its guest to touch
        every page."""
        with self.lock:
            self.populating = True
            workers = list(self.workers)
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.send({"op": "populate"})

    def source_total(self) -> SourceStats | None:
        """The store source counters (``--workers 0``: this process's source's)."""
        if self.options.worker_count == 0:
            return self._served.source_stats()
        return self.source_stats.total()

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
            self.on_report(doc, w.pid)
        with self.lock:
            self.source_stats.retire(w.pid)
        if self.stopping:
            return
        if w.retiring:
            if not w.wait(5):
                log.error("serving worker %d did not stop; killing it", w.index)
            w.kill()
            return
        code = w.kill()
        self._replace(w, code)

    def _spawn(self, index: int, *, dedicated: bool = False) -> WorkerProc | None:
        """Start a worker, wait until it is ready and watch it; retried (a worker can die
        while it starts) until the server stops or it failed ``_SPAWN_TRIES`` times."""
        refused = 0
        for attempt in range(_SPAWN_TRIES):
            if self.stopping:
                return None
            assert self._factory is not None
            try:
                w = self._factory.ready(index)
                break
            except (PageinError, OSError) as e:
                with self.lock:
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
        with self.lock:
            self._procs.append(w)
            self.workers.append(w)
            waiting: list[AttachedVm] = []
            if not w.dedicated:
                waiting, self._waiting = self._waiting, []
        threading.Thread(target=self._watch_worker, args=(w,), daemon=True,
                         name=f"pagein-worker-{w.index}").start()
        for vm in waiting:  # VMs that connected while no worker was alive
            self._hand(vm, w, resume=False)

    # --- a worker died -------------------------------------------------------------------

    def _replace(self, dead: WorkerProc, code: int | None) -> None:
        """Start a worker in place of ``dead`` and hand it the dead one's VMs (see
        :mod:`pagein.serve.recovery`): they go on; only a VM that keeps being served by
        dying workers fails, and one caught in a second crash is served alone."""
        now = time.monotonic()
        with self.lock:
            self._procs = [w for w in self._procs if w is not dead]
            self.workers = [w for w in self.workers if w is not dead]
            orphans = [self.vms[i] for i in sorted(dead.vms) if i in self.vms]
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

    def _fail_vm(self, vm: AttachedVm, why: str) -> None:
        kill = self.options.on_vm_failure is VmFailurePolicy.KILL
        log.error("%s: serving failed for good (%s); %s", vm.name, why,
                  "killing its VMM (--on-vm-failure freeze leaves it)" if kill
                  else "its guest stays frozen (--on-vm-failure freeze)")
        if kill:
            kill_vmm(vm.pidfd, vm.peer.pid)
        self._vm_ended(vm.id, "failed")

    def on_report(self, doc: dict[str, object], worker: int | None = None) -> None:
        """Act on a worker's report (a VM started or ended, its source's counters)."""
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
            with self.lock:
                self.source_stats.update(worker, stats)
            return
        if doc.get("op") == "started" and isinstance(vm_id, int):
            with self.lock:
                if vm_id in self.vms:
                    self.vms[vm_id].engine = str(doc.get("engine", ""))
        elif doc.get("op") == "ended" and isinstance(vm_id, int):
            self._vm_ended(vm_id, str(doc.get("end", "failed")))

    def _vm_ended(self, vm_id: int, end: str) -> None:
        done = self.retire(vm_id, end)
        if done is not None:
            self._on_ended(done)

    def retire(self, vm_id: int, end: str) -> int | None:
        """Keep the final counters of a VM that ended, release its fds and state; return
        how many VMs have ended (None when it had already been retired)."""
        with self.lock:
            vm = self.vms.pop(vm_id, None)
            if vm is None:
                return None
            w = vm.worker
            if w is not None:
                w.vms.discard(vm_id)
            if isinstance(w, WorkerProc) and w.dedicated and not w.vms and not self.stopping:
                # A worker of its own for a suspect VM: it goes with the VM.
                w.retiring = True
                self._procs = [x for x in self._procs if x is not w]
                self.workers = [x for x in self.workers if x is not w]
                with contextlib.suppress(OSError):
                    w.send({"op": "stop"})
            done = self.ended.add(vm.row(end, time.monotonic()))
        if vm.cache is not None:
            self._caches.release(vm.cache)
        vm.release()
        return done

    def _hand(self, vm: AttachedVm, w: WorkerProc | InProcess, *, resume: bool) -> None:
        """Send ``vm`` (its uffd, socket and state) to worker ``w``.

        ``w`` may have died since it was chosen. The VM joins ``w.vms`` only while ``w``
        is in the pool, under the lock that :meth:`_replace` takes to remove a dead
        worker and collect its VMs: so either ``_replace`` will find the VM there, or
        ``w`` is gone already and a live worker is chosen (or, with none alive, the VM
        waits for the next one adopted). A send that fails therefore needs nothing
        more: the worker is dead, and its successor gets the VM.
        """
        with self.lock:
            if isinstance(w, WorkerProc) and w not in self.workers:
                pool = [x for x in self.workers if not x.dedicated]
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
            fds = vm.fds()
            w.send({**vm.doc, "pending": "" if resume else vm.doc["pending"],
                    "populate": self.populating, "fds": list(fds)}, list(fds.values()))
        except (OSError, ValueError) as e:  # ValueError: our end already closed
            log.warning("%s: worker %d went away as the VM was handed to it (%s); its "
                        "successor takes the VM", vm.name, w.index, e)
