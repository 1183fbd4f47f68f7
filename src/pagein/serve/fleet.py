"""One daemon, many snapshots: a :class:`~pagein.serve.server.Server` per snapshot, each
on its own socket, all in one ``pagein serve`` process.

Each snapshot's server runs its own accept loop (a thread) and its own serving workers,
all forked by one zygote (:class:`~pagein.serve.workers.Zygote`); they share this
process's store clients' host cache (one
:class:`~pagein.snapshot.store.cache.ChunkCache` per cache directory), one metrics
endpoint (every series labelled ``snapshot``) and one stats file. The fleet owns the
signals: SIGTERM drains every server (each VM populates its missing pages and goes),
SIGHUP reloads ``--config``: a snapshot added is served, one removed is drained (its
VMs are not cut off), one whose entry changed is drained and served anew; a file that
no longer parses is one ERROR line and changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagein.errors import ConfigError, PageinError
from pagein.serve.config import Fleet
from pagein.serve.logs import LIFECYCLE
from pagein.serve.options import ServeOptions
from pagein.serve.served import Served, open_served
from pagein.serve.server import Server
from pagein.serve.session import choose
from pagein.serve.stats import ServerSample, write_json
from pagein.serve.workers import Zygote
from pagein.sys.process import set_child_subreaper
from pagein.sys.systemd import notify

__all__ = ["FleetServer"]

log = logging.getLogger("pagein.serve")
lifecycle = logging.getLogger(LIFECYCLE)

_RELEASE_WAIT_S = 10.0  # how long a changed entry waits for its old socket to be let go


@dataclass(slots=True)
class _Member:
    name: str
    options: ServeOptions
    served: Served
    server: Server
    thread: threading.Thread


class FleetServer:
    """Serve every snapshot ``load()`` names; :meth:`serve_forever` until stopped.

    ``load`` reads the configuration (again at each SIGHUP; None: nothing to reload);
    ``stats_json`` is the one stats file of every snapshot.
    """

    def __init__(self, fleet: Fleet, load: Callable[[], Fleet] | None,
                 stats_json: str | None) -> None:
        self._load = load
        self._stats_json = stats_json
        self._lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        self._leaving: list[_Member] = []  # removed from the config, draining
        self._ended: dict[str, dict[str, object]] = {}  # the last stats of servers that ended
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wanted: set[str] = set()
        self._stopping = False
        self._zygote = self._start_zygote(fleet)
        try:
            for name, opts in fleet.snapshots.items():
                self._start(name, opts)
        except BaseException:
            self._stop_all(now=True)
            self._join_all()
            self._close_zygote()
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)
            raise

    @staticmethod
    def _start_zygote(fleet: Fleet) -> Zygote | None:
        """One zygote forks the workers of every snapshot (each fork names its snapshot's
        options): one process, not one per snapshot. None: each server starts its own."""
        first = next(iter(fleet.snapshots.values()))
        try:
            set_child_subreaper()
            return Zygote(first, choose(first.engine)[0], None)
        except (PageinError, OSError) as e:
            log.warning("no shared worker zygote (%s): each snapshot starts its own", e)
            return None

    def _close_zygote(self) -> None:
        z, self._zygote = self._zygote, None
        if z is not None:
            z.close()

    # --- members -------------------------------------------------------------------

    def _start(self, name: str, opts: ServeOptions) -> None:
        """Open snapshot ``name`` and serve it from a thread (its socket is bound here:
        a bad entry fails now, with the entry's name)."""
        directory = os.path.dirname(os.path.abspath(opts.socket_path))
        try:
            # The sockets' directory (--socket-dir, socket_dir) is made if missing, as
            # systemd's RuntimeDirectory= would be.
            os.makedirs(directory, 0o755, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"snapshot {name}: cannot make {directory} for its socket: "
                              f"{e.strerror or e}") from e
        try:
            served = open_served(opts, warm=True)
            try:
                server = Server(served, zygote=self._zygote)
            except BaseException:
                served.close()
                raise
        except PageinError as e:  # one line naming the snapshot, of the same kind
            kind = ConfigError if isinstance(e, ConfigError) else PageinError
            raise kind(f"snapshot {name}: {e}") from e
        t = threading.Thread(target=self._run, args=(server,), daemon=True,
                             name=f"pagein-{name}"[:15])
        member = _Member(name, opts, served, server, t)
        with self._lock:
            self._members[name] = member
        t.start()

    def _run(self, server: Server) -> None:
        try:
            server.serve_forever()
        finally:
            self._wake()  # the main loop closes what this server served

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._sig_w, b"x")

    # --- signals (set flags; the loop acts) ---------------------------------------------

    def request(self, what: str) -> None:
        """Ask the loop for ``stop``, ``stop-now``, ``reload`` or ``stats`` (for a signal
        handler: sets a flag)."""
        self._wanted.add(what)
        self._wake()

    def wake_on_signals(self) -> None:
        """Make every signal wake :meth:`serve_forever` (see Server.wake_on_signals)."""
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    # --- running -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until every snapshot's server has ended (after a stop request)."""
        with self._lock:
            names = list(self._members)
        lifecycle.info("serving %d snapshot(s) from one daemon: %s", len(names),
                       ", ".join(names[:20]) + (", ..." if len(names) > 20 else ""))
        notify("READY=1", f"STATUS=serving {len(names)} snapshot(s)")
        poller = select.poll()
        poller.register(self._sig_r, select.POLLIN)
        try:
            while True:
                wanted, self._wanted = self._wanted, set()
                self._act(wanted)
                self._reap()
                with self._lock:
                    if self._stopping and not self._members and not self._leaving:
                        break
                poller.poll(1000)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._sig_r, 4096)
        finally:
            self._stop_all(now=True)
            self._join_all()
            self._close_zygote()
            signal.set_wakeup_fd(-1)
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)

    def _act(self, wanted: set[str]) -> None:
        if "stop-now" in wanted:
            self._stop_all(now=True)
        elif "stop" in wanted:
            if self._stopping:  # a second SIGTERM stops at once
                self._stop_all(now=True)
            else:
                notify("STOPPING=1")
                self._stop_all(now=False)
        if "reload" in wanted and not self._stopping:
            self._reload()
        if "stats" in wanted or "reload" in wanted:
            self.write_stats()

    def _stop_all(self, *, now: bool) -> None:
        self._stopping = True
        with self._lock:
            members = [*self._members.values(), *self._leaving]
        for m in members:
            if now:
                m.server.request_stop_now()
            else:
                m.server.request_stop()

    def _reap(self) -> None:
        """Close the snapshots whose servers have ended."""
        with self._lock:
            done = [m for m in [*self._members.values(), *self._leaving]
                    if not m.thread.is_alive()]
            for m in done:
                if self._members.get(m.name) is m:
                    del self._members[m.name]
                if m in self._leaving:
                    self._leaving.remove(m)
        for m in done:
            self._close(m)
            if not self._stopping:
                lifecycle.info("snapshot %s: no longer served", m.name)

    def _join_all(self) -> None:
        with self._lock:
            members = [*self._members.values(), *self._leaving]
            self._members, self._leaving = {}, []
        for m in members:
            self._close(m)

    def _close(self, m: _Member) -> None:
        """Close an ended server's snapshot; keep its last stats for the stats file."""
        m.thread.join()
        doc = m.server.stats_doc()
        with self._lock:
            self._ended[m.name] = doc
        m.served.close()

    def _reload(self) -> None:
        """SIGHUP: read the config again and apply what changed; a bad file changes nothing."""
        if self._load is None:
            for m in list(self._members.values()):
                m.server.request_state()
            return
        try:
            fleet = self._load()
        except PageinError as e:
            log.error("SIGHUP: not reloading: %s; still serving %d snapshot(s) as before",
                      e, len(self._members))
            return
        with self._lock:
            old = dict(self._members)
        gone = [m for n, m in old.items() if fleet.snapshots.get(n) != m.options]
        for m in gone:
            with self._lock:
                del self._members[m.name]
                self._leaving.append(m)
            m.server.request_stop()  # drain: stop accepting, its VMs populate and go
        for m in gone:  # a changed entry's socket must be let go before it is bound again
            deadline = time.monotonic() + _RELEASE_WAIT_S
            while m.server.accepting() and time.monotonic() < deadline:
                time.sleep(0.01)
        added = changed = 0
        for name, opts in fleet.snapshots.items():
            if name in self._members:
                continue
            try:
                self._start(name, opts)
            except PageinError as e:
                log.error("SIGHUP: snapshot %s not served: %s", name, e)
                continue
            if name in old:
                changed += 1
            else:
                added += 1
        lifecycle.info("SIGHUP: reloaded %s: %d snapshot(s) added, %d changed, %d removed "
                       "(draining), %d serving", fleet.origin, added, changed,
                       len(gone) - changed, len(self._members))

    # --- stats -------------------------------------------------------------------------

    def samples(self) -> list[tuple[str, ServerSample]]:
        """Each snapshot served now and its counters (what the metrics read)."""
        with self._lock:
            members = list(self._members.values())
        return [(m.name, m.server.sample(m.options.metrics_keep_ended_s)) for m in members]

    def write_stats(self) -> bool:
        """Write the stats of every snapshot to ``--stats-json`` (if given)."""
        if self._stats_json is None:
            return True
        with self._lock:
            members = list(self._members.values())
            ended = dict(self._ended)
        # A snapshot no longer served keeps its last counters (until one of its name is
        # served again): the file says what each served, also after a reload or at exit.
        snapshots = {**ended, **{m.name: m.server.stats_doc() for m in members}}
        doc: dict[str, object] = {"snapshots": snapshots}
        try:
            write_json(self._stats_json, doc)
        except OSError as e:
            log.error("cannot write --stats-json %s: %s; serving goes on", self._stats_json,
                      e.strerror or e)
            return False
        return True
