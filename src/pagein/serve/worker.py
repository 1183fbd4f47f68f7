"""A serving worker: a child process of ``pagein serve`` that serves the VMs its
supervisor hands it, each in a thread running the fault engine.

Why processes: the sessions of one process share its GIL; with the native engine the
per-fault path runs without it, but everything else a session does (events, plans,
strategies, the Python engine) would still queue behind other VMs. Workers are
separate interpreters, one per CPU by default, so VMs are served in parallel on every
core, and a worker that dies takes no other worker's VMs with it.

The channel (:mod:`pagein.serve.control`), supervisor to worker::

    {"op": "init", "options": {...}, "engine": "native", "log_level": 20, "index": 0,
     "identity": [st_dev, st_ino, size, mtime_ns, ctime_ns] | null}   (the memory file's)
    {"op": "serve", "vm": 7, "name": "vm 7 pid=1234", "regions": [[base, size, offset,
     page_size], ...], "features": N, "pending": "<hex>", "record": PATH|null,
     "trace": PATH|null, "cache": [size, page_size]|null,
     "fds": ["uffd", "socket", "state"(, "pagemap")(, "cache-data", "cache-present")]}
                     + those fds, in that order (the VMM's uffd and socket, the state
                       memfd, the VMM's pagemap, the page cache's data and present)
    {"op": "adopt", "index": 2}            (a spare, started with index -1, put to work)
    {"op": "populate"}                     (the server drains: fill every VM's missing
                                            pages now; a serve message may say
                                            "populate": true for the same)
    {"op": "stop"}

and back: ``{"op": "ready"}`` (or ``{"op": "failed", "error": ...}``) after init,
``{"op": "started", "vm": 7, "engine": "native"}`` and ``{"op": "ended", "vm": 7,
"end": "peer exited"}`` per VM. The supervisor keeps its own copies of every fd, so the
uffd never closes while the VM lives. If the supervisor goes away (EOF) the worker stops
serving and exits: its VMs freeze, as they would with one dead handler process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pagein.errors import PageinError
from pagein.serve.control import ControlError, name_fds, recv_msg, send_msg
from pagein.serve.crash import CrashPoint, claim, crash
from pagein.serve.engine import EngineName
from pagein.serve.firecracker import Region
from pagein.serve.logs import LogFormat, configure
from pagein.serve.options import ServeOptions
from pagein.serve.pagecache import CacheFiller
from pagein.serve.record import Recorder
from pagein.serve.served import Served, open_served
from pagein.serve.session import Nudge, Session, choose
from pagein.serve.state import VmState
from pagein.sys.process import set_name
from pagein.sys.uffd import Feature, Userfaultfd

__all__ = ["VM_FDS", "VM_OPTIONAL_FDS", "VmServer", "main"]

log = logging.getLogger("pagein.serve")

#: The fds every serve message carries, and those some do, by the names it gives them.
VM_FDS = ("uffd", "socket", "state")
VM_OPTIONAL_FDS = ("pagemap", "cache-data", "cache-present")

#: How often a worker sends its store source's counters to the supervisor.
SOURCE_STATS_EVERY_S = 1.0


class VmServer:
    """Serve the VMs handed to :meth:`start_vm`, each in a thread; report what happens
    through ``report`` (the control channel in a worker process, a callback in-process)."""

    def __init__(self, served: Served, engine: EngineName,
                 report: Callable[[dict[str, object]], None]) -> None:
        self.served = served
        self.engine = engine
        self.send = report
        self._lock = threading.Lock()
        self._nudges: set[Nudge] = set()  # one per session: stop or populate it
        self._stopping = False
        self._populating = False
        self._threads: list[threading.Thread] = []

    def start_vm(self, doc: dict[str, object], fds: Sequence[int]) -> None:
        """Serve one VM in a thread; ``fds`` (now owned here) are the ones ``doc["fds"]``
        names (:data:`VM_FDS`, :data:`VM_OPTIONAL_FDS`; checked by
        :func:`~pagein.serve.control.name_fds` before this is called)."""
        t = threading.Thread(target=self._serve_vm, args=(doc, fds), daemon=True,
                             name=str(doc.get("name", "vm"))[:64])
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        """End every session (STOPPED) and wait for their threads."""
        with self._lock:
            self._stopping = True
            nudges = list(self._nudges)
        for n in nudges:
            n.stop()
        for t in self._threads:
            t.join()

    def populate_all(self) -> None:
        """Make every session, and each started from now on, fill all its missing pages
        (the server drains: see :class:`~pagein.serve.session.Nudge`)."""
        with self._lock:
            self._populating = True
            nudges = list(self._nudges)
        for n in nudges:
            n.populate()

    def _nudge(self, populate: bool) -> Nudge:
        nudge = Nudge()
        with self._lock:
            self._nudges.add(nudge)
            stopping, populating = self._stopping, self._populating or populate
        if stopping:
            nudge.stop()
        elif populating:
            nudge.populate()
        return nudge

    def _forget(self, nudge: Nudge) -> None:
        with self._lock:
            self._nudges.discard(nudge)
        nudge.close()

    def live(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def _serve_vm(self, doc: dict[str, object], fds: Sequence[int]) -> None:
        try:
            named = name_fds(doc.get("fds"), fds, required=VM_FDS, optional=VM_OPTIONAL_FDS)
        except ControlError as e:
            log.error("%s: cannot start serving: %s", str(doc.get("name", "vm"))[:64], e)
            for fd in fds:
                os.close(fd)
            self.send({"op": "ended", "vm": doc.get("vm"), "end": "failed"})
            return
        uffd_fd, conn_fd, state_fd = (named[n] for n in VM_FDS)
        pagemap_fd = named.get("pagemap", -1)
        cache_fds = [named[n] for n in ("cache-data", "cache-present") if n in named]
        cache: CacheFiller | None = None
        name = str(doc.get("name", "vm"))
        sock = socket.socket(fileno=conn_fd)
        uffd = Userfaultfd.adopt(uffd_fd, features=Feature(int(str(doc.get("features", 0)))))
        state: VmState | None = None
        session: Session | None = None
        nudge = self._nudge(doc.get("populate") is True)
        end = "failed"
        try:
            raw_regions = doc.get("regions")
            if not isinstance(raw_regions, list):
                raise ControlError("a serve message without a region list")
            regions = [Region(int(a), int(b), int(c), int(d)) for a, b, c, d in raw_regions]
            if claim(CrashPoint.SERVE):  # a recovery test: die holding the VM, unserved
                crash(CrashPoint.SERVE)
            fd, state_fd = state_fd, -1
            state = VmState.attach(fd, regions)  # owns fd from here, even if it raises
            record, trace = doc.get("record"), doc.get("trace")
            recorder = None
            if record is not None or trace is not None:
                recorder = Recorder(trace_path=None if trace is None else str(trace),
                                    working_set_path=None if record is None else str(record),
                                    strategy=self.served.options.strategy_label)
            cache_doc = doc.get("cache")
            if cache_fds:
                if not isinstance(cache_doc, list) or len(cache_doc) != 2 \
                        or len(cache_fds) != 2:
                    raise ControlError("a serve message with cache fds and no cache size, "
                                       "or one of the two cache fds")
                data_fd, present_fd = cache_fds
                cache_fds = []
                cache = CacheFiller.attach(data_fd, present_fd, int(cache_doc[0]),
                                           int(cache_doc[1]))
            resume = state.attach_worker() > 1
            if resume and record is not None:
                log.warning("%s: a serving worker died while recording its working set: "
                            "%s will hold only the faults served from now on", name, record)
            session = Session(uffd=uffd, sock=sock, regions=regions,
                              source=self.served.source, strategy=self.served.strategy(),
                              state=state, name=name, stop_fd=nudge.fd, engine=self.engine,
                              recorder=recorder, chunk_bytes=self.served.options.chunk_bytes,
                              pending=bytes.fromhex(str(doc.get("pending", ""))),
                              resume=resume, pagemap_fd=pagemap_fd,
                              guard=self.served.guard, cache=cache, nudge=nudge,
                              collapse=self.served.options.collapse)
            self.send({"op": "started", "vm": doc["vm"],
                       "engine": session.engine_name.value})
            end = session.run().value
        except (PageinError, OSError, ValueError) as e:
            log.error("%s: cannot start serving: %s; its guest is frozen", name, e)
        finally:
            for part in (session, uffd, sock, state, cache):
                if part is not None:
                    part.close()
            for fd in [state_fd, pagemap_fd, *cache_fds]:
                if fd >= 0:
                    os.close(fd)
            self._forget(nudge)
            self.send({"op": "ended", "vm": doc.get("vm"), "end": end})


class _Channel:
    """The worker process's end of the control channel."""

    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self._lock = threading.Lock()
        self.connected = True

    def report(self, doc: dict[str, object]) -> None:
        with self._lock:
            if not self.connected:
                return
            try:
                send_msg(self.ctl, doc)
            except OSError:
                self.connected = False

    def serve(self, vms: VmServer) -> None:
        """Take VMs from the supervisor until it says stop or goes away."""
        while True:
            try:
                got = recv_msg(self.ctl)
            except (ControlError, OSError, ValueError) as e:
                log.error("worker: control channel failed: %s", e)
                got = None
            if got is None:
                # The supervisor is gone: stop too. Its VMs freeze (their VMMs keep their
                # own uffd copies: never zero pages), loudly, as one dead handler does.
                with self._lock:
                    self.connected = False
                if vms.live():
                    log.error("worker: the supervisor is gone; stopping %d VM session(s)",
                              vms.live())
                break
            doc, fds = got
            op = doc.get("op")
            if op == "serve" and fds:
                try:
                    name_fds(doc.get("fds"), fds, required=VM_FDS, optional=VM_OPTIONAL_FDS)
                except ControlError as e:
                    log.error("worker: refusing a serve message: %s", e)
                    for fd in fds:
                        os.close(fd)
                    continue
                vms.start_vm(doc, fds)
            elif op == "populate" and not fds:  # the server drains
                vms.populate_all()
            elif op == "adopt" and not fds:  # a spare put to work
                _name_worker(doc, int(str(doc.get("index", 0))))
            elif op == "stop":
                break
            else:
                for fd in fds:
                    os.close(fd)
                log.error("worker: unexpected control message %r", str(op)[:64])
        vms.stop()


def _serve_as_worker(ctl: socket.socket, doc: dict[str, object]) -> int:
    """Open the source, say ready, serve VMs until told to stop; the exit status."""
    try:
        options = ServeOptions.from_json(doc["options"])  # type: ignore[arg-type]
        served = open_served(options)
    except (PageinError, OSError, ValueError, KeyError) as e:
        send_msg(ctl, {"op": "failed", "error": str(e)})
        return 1
    done = threading.Event()
    try:
        # The file this worker opened must be the one the supervisor checked handshakes
        # against (a worker started later could open a file renamed over it).
        identity = doc.get("identity")
        served.guard.expect(identity if isinstance(identity, list) else None)
        served.guard.start()  # this worker's own lease on the memory file
        channel = _Channel(ctl)
        engine, _ = choose(EngineName(str(doc.get("engine", "native"))))  # imports it now
        vms = VmServer(served, engine, channel.report)
        channel.report({"op": "ready", "pid": os.getpid()})
        if served.source_stats() is not None:
            threading.Thread(target=_report_source_stats, args=(served, channel, done),
                             daemon=True, name="pagein-source-stats").start()
        channel.serve(vms)
        final = served.source_stats()
        if final is not None:  # the last counts (unless the supervisor is gone)
            channel.report({"op": "source-stats", "stats": final.to_doc()})
    finally:
        done.set()
        served.close()
    return 0


def _report_source_stats(served: Served, channel: _Channel, done: threading.Event) -> None:
    """Send the store source's counters to the supervisor every second while they change.

    The host cache lives in this process (each worker opens its own source); the
    supervisor keeps the last values of every worker, also of one that died, so its
    totals never drop. A scrape sees them at most a second late.
    """
    last = None
    while not done.wait(SOURCE_STATS_EVERY_S):
        stats = served.source_stats()
        if stats is not None and stats != last:
            channel.report({"op": "source-stats", "stats": stats.to_doc()})
            last = stats


def _configure_logging(doc: dict[str, object], what: str) -> None:
    """Log as the supervisor does (its level and ``--log-format``), naming this process."""
    try:
        fmt = LogFormat(str(doc.get("log_format", LogFormat.TEXT.value)))
    except ValueError:
        fmt = LogFormat.TEXT
    configure(int(str(doc.get("log_level", logging.WARNING))), fmt, what)


def _name_worker(doc: dict[str, object], index: int) -> None:
    """Name this worker in its log lines and in ``ps`` (``pagein-spare`` until a spare is
    put to work as worker ``index``)."""
    _configure_logging(doc, f"worker {index}" if index >= 0 else "spare worker")
    with contextlib.suppress(OSError):
        set_name(f"pagein-worker{index}" if index >= 0 else "pagein-spare")


def _forked_worker(ctl_fd: int, doc: dict[str, object], intermediate: int) -> int:
    """The body of a worker forked by the zygote (the grandchild: see :func:`_zygote`)."""
    # Speak only once reparented to the supervisor (a subreaper): it can then wait for
    # this pid, and no other process can get the pid before the supervisor reaps it.
    deadline = time.monotonic() + 5.0
    while os.getppid() == intermediate and time.monotonic() < deadline:
        time.sleep(0.0002)
    _name_worker(doc, int(str(doc.get("index", 0))))
    return _serve_as_worker(socket.socket(fileno=ctl_fd), doc)


def _zygote(ctl: socket.socket, doc: dict[str, object]) -> int:
    """Fork ready-to-serve workers on request, in milliseconds instead of an interpreter
    start and pagein's imports (~0.5 s here): what a VM waits when its worker died.

    One thread only (forking a threaded process is unsafe), no source opened (a source
    may hold threads or connections: each worker opens its own). A ``fork`` request
    brings the new worker's control socket; the zygote forks twice and the middle child
    exits at once, so the worker is reparented to the supervisor, which made itself a
    subreaper: the worker is the supervisor's child (it waits for its exit status and
    signals it through a pidfd), not the zygote's.
    """
    _configure_logging(doc, "zygote")
    with contextlib.suppress(OSError):
        set_name("pagein-zygote")
    choose(EngineName(str(doc.get("engine", "native"))))  # import the engine once, here
    send_msg(ctl, {"op": "ready", "pid": os.getpid()})
    while True:
        got = recv_msg(ctl)
        if got is None:
            return 0
        msg, fds = got
        if msg.get("op") == "stop":
            return 0
        if msg.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.error("zygote: unexpected control message %r", str(msg.get("op"))[:64])
            continue
        try:
            middle = os.fork()
        except OSError as e:
            os.close(fds[0])
            send_msg(ctl, {"op": "forked", "error": f"fork: {e}"})
            continue
        if middle == 0:
            code = 0
            me = os.getpid()
            try:
                if os.fork() == 0:
                    ctl.close()
                    # One zygote may fork the workers of several snapshots (a fleet): the
                    # request names the snapshot's options and file identity.
                    init = msg.get("init")
                    child = {**doc, **(init if isinstance(init, dict) else {}),
                             "index": msg.get("index", 0)}
                    code = _forked_worker(fds[0], child,
                                          intermediate=me)
            except BaseException:  # a forked child must never return into the zygote
                log.exception("forked serving worker failed")
                code = 1
            logging.shutdown()
            os._exit(code)
        os.close(fds[0])
        os.waitpid(middle, 0)
        send_msg(ctl, {"op": "forked"})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pagein.serve.worker [--zygote] CONTROL_FD``: run one serving worker,
    or the zygote that forks them (both started by ``pagein serve``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    zygote = args[:1] == ["--zygote"]
    if zygote:
        args = args[1:]
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m pagein.serve.worker [--zygote] CONTROL_FD "
              "(started by pagein serve)", file=sys.stderr)
        return 2
    ctl = socket.socket(fileno=int(args[0]))
    got = recv_msg(ctl)
    if got is None or got[0].get("op") != "init":
        return 2
    doc = got[0]
    if zygote:
        return _zygote(ctl, doc)
    _name_worker(doc, int(str(doc.get("index", 0))))
    return _serve_as_worker(ctl, doc)


if __name__ == "__main__":
    sys.exit(main())
