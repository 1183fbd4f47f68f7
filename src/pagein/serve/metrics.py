"""The Prometheus endpoint of ``pagein serve``: a collector over the supervisor's view of
every VM, and the HTTP server that answers ``/metrics`` (only).

Every serving worker writes its VMs' counters into each VM's shared serving state
(:mod:`pagein.serve.state`), and the supervisor reads them from there for the stats
file; this collector reads the same words at scrape time (a server's ``sample``). So
``prometheus_client``'s multiprocess mode (one file per process, merged at scrape) is
not needed: there is one reader, the supervisor, and the values it reads are already
shared. Nothing here runs in a worker, and a worker never imports this module.

Names follow the Prometheus naming guide: the unit last (``_bytes``, ``_seconds``),
counters end in ``_total``, and why something happened is a label, not a name
(``pagein_filled_bytes_total{cause="readahead"}``). Each counter exists twice:

- ``pagein_vm_*{session, pid}``: one series per VM session. ``session`` is the
  server's number for it (the VMM's pid is reused by later processes); the series
  of a VM that ended stay ``--metrics-keep-ended`` seconds, with ``pagein_vm_active`` 0,
  then disappear, so a fleet of short-lived VMs does not grow the scrape forever.
- ``pagein_*`` without those labels: the server's total over every session it ever
  served, ended ones included (a counter never goes down when a VM's series go).

The whole list, with types and units, is in docs/serve.md ("Observability").
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import pagein
from pagein.errors import ConfigError
from pagein.serve.cause import Cause
from pagein.serve.session import SessionEnd
from pagein.serve.stats import LATENCY_BUCKETS_US, Counters, ServerSample, VmRow
from pagein.snapshot.source import FETCH_BUCKETS_S, SourceStats

__all__ = ["FleetCollector", "MetricsEndpoint", "Sampler", "ServerCollector", "exposition"]

VM_LABELS = ("session", "pid")
#: Seconds a scrape connection may stay silent before it is closed.
SCRAPE_TIMEOUT_S = 10.0

# (counter attribute, name after pagein_ / pagein_vm_, help)
_SCALARS = (
    ("faults", "faults_total", "Page-fault messages served (duplicates included)."),
    ("pages", "installed_pages_total", "Pages installed in guest memory, any cause."),
    ("zero_pages", "zero_pages_total", "Pages installed as zeros (holes, removed ranges)."),
    ("retries", "fill_retries_total",
     "Fills deferred because the kernel answered EAGAIN (an event was unread)."),
    ("eexist", "fill_already_present_total",
     "Fills that found the page already installed (EEXIST; the waiters were woken)."),
    ("removed_bytes", "removed_bytes_total",
     "Bytes a REMOVE event discarded (balloon, MADV_DONTNEED); they read zeros after."),
)
# Bytes copied from the snapshot, by why: Cause labels (prefetch counts as background).
_FILLED = ((Cause.DEMAND, "bytes_fault"), (Cause.READAHEAD, "bytes_readahead"),
           (Cause.BACKGROUND, "bytes_background"))
_EVENTS = (("remove", "removes"), ("unmap", "unmaps"), ("remap", "remaps"))
_COLLAPSES = (("ok", "collapsed"), ("failed", "collapse_failed"))


def _buckets(c: Counters) -> list[tuple[str, float]]:
    """The latency histogram as Prometheus wants it: cumulative, bounds in seconds."""
    out: list[tuple[str, float]] = []
    cumulative = 0
    for bound, n in zip([*LATENCY_BUCKETS_US, None], c.latency_us_buckets, strict=True):
        cumulative += n
        out.append(("+Inf" if bound is None else f"{bound / 1e6:g}", cumulative))
    return out


class _Families:
    """One family per counter, filled with the per-VM rows or with the totals."""

    def __init__(self, prefix: str, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.scalars = [(attr, CounterMetricFamily(f"{prefix}{name}", doc, labels=labels))
                        for attr, name, doc in _SCALARS]
        self.filled = CounterMetricFamily(
            f"{prefix}filled_bytes_total", "Bytes copied from the snapshot into guest memory, "
            "by cause (demand: the faulting page; readahead: around it; background: "
            "populate-all and working-set plans).", labels=(*labels, "cause"))
        self.events = CounterMetricFamily(
            f"{prefix}uffd_events_total", "Non-fault userfaultfd events applied, by event.",
            labels=(*labels, "event"))
        self.collapses = CounterMetricFamily(
            f"{prefix}huge_page_collapses_total", "Wholly filled 2 MiB ranges the server asked "
            "the kernel to map with one huge page (MADV_COLLAPSE), by result (ok: collapsed; "
            "failed: refused).", labels=(*labels, "result"))
        self.latency = HistogramMetricFamily(
            f"{prefix}fault_latency_seconds",
            "Time from reading a fault to its page being installed.", labels=labels)

    def add(self, values: list[str], c: Counters) -> None:
        for attr, family in self.scalars:
            family.add_metric(values, getattr(c, attr))
        for cause, attr in _FILLED:
            self.filled.add_metric([*values, cause.label], getattr(c, attr))
        for event, attr in _EVENTS:
            self.events.add_metric([*values, event], getattr(c, attr))
        for result, attr in _COLLAPSES:
            self.collapses.add_metric([*values, result], getattr(c, attr))
        self.latency.add_metric(values, _buckets(c), c.latency_us_sum / 1e6)

    def all(self) -> Iterator[Metric]:
        yield from (family for _, family in self.scalars)
        yield from (self.filled, self.events, self.collapses, self.latency)


class ServerCollector(Collector):
    """Read a :class:`~pagein.serve.server.Server` at every scrape (no state of its own)."""

    def __init__(self, sample: Callable[[], ServerSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        s = self._sample()
        yield from self._vm_families(s.rows)
        total = _Families("pagein_", ())
        total.add([], s.total)
        yield from total.all()
        yield _counter("pagein_without_worker_seconds_total",
                       "Time VMs spent with no worker serving them, summed over every VM.",
                       s.ms_without_worker / 1000)
        yield _gauge("pagein_sessions_active", "VM sessions being served now.",
                     s.sessions_active)
        ended = CounterMetricFamily("pagein_sessions_ended_total",
                                    "VM sessions that ended, by how they ended.",
                                    labels=("end",))
        for end in dict.fromkeys([*(e.value for e in SessionEnd), *s.sessions_ended]):
            ended.add_metric([end], s.sessions_ended.get(end, 0))
        yield ended
        yield _counter("pagein_handshake_failures_total",
                       "Bad or unfinished handshakes of peers the allow-list let in.",
                       s.handshake_failures)
        yield _counter("pagein_refused_peers_total",
                       "Connections refused by the allow-list (--allow-uid/--allow-gid).",
                       s.refused_peers)
        yield _counter("pagein_worker_restarts_total",
                       "Serving workers that died while serving (each was replaced).",
                       s.worker_restarts)
        yield _counter("pagein_worker_start_failures_total",
                       "Serving workers that died or failed while starting.",
                       s.worker_start_failures)
        yield _gauge("pagein_workers", "Serving worker processes in the pool.", s.workers)
        if s.source is not None:
            yield from _store_families(s.source)
        info = GaugeMetricFamily("pagein_build_info", "The pagein serving: version, fault "
                                 "engine, Python; always 1.",
                                 labels=("version", "engine", "python"))
        info.add_metric([pagein.__version__, s.engine, platform.python_version()], 1)
        yield info

    @staticmethod
    def _vm_families(rows: Iterable[VmRow]) -> Iterator[Metric]:
        per_vm = _Families("pagein_vm_", VM_LABELS)
        active = GaugeMetricFamily("pagein_vm_active", "1 while the VM session is served, 0 "
                                   "once it ended (its series go a while later).",
                                   labels=VM_LABELS)
        restarts = CounterMetricFamily("pagein_vm_worker_restarts_total",
                                       "Serving workers that died while serving this VM.",
                                       labels=VM_LABELS)
        down = CounterMetricFamily("pagein_vm_without_worker_seconds_total",
                                   "Time this VM spent with no worker serving it.",
                                   labels=VM_LABELS)
        for r in rows:
            values = [str(r.session), str(r.peer_pid)]
            per_vm.add(values, r.counters)
            active.add_metric(values, 1 if r.state == "active" else 0)
            restarts.add_metric(values, r.worker_restarts)
            down.add_metric(values, r.ms_without_worker / 1000)
        yield from per_vm.all()
        yield from (active, restarts, down)


def _store_families(st: SourceStats) -> Iterator[Metric]:
    """A store source's host cache and fetches, summed over the serving workers."""
    hits = CounterMetricFamily("pagein_store_cache_hits_total",
                               "Chunk reads the host cache answered, by tier (memory: this "
                               "process's verified chunks; disk: the host's cache directory).",
                               labels=("tier",))
    hits.add_metric(["memory"], st.cache_hits_memory)
    hits.add_metric(["disk"], st.cache_hits_disk)
    yield hits
    yield _counter("pagein_store_cache_misses_total",
                   "Chunk reads neither cache could answer: each one a fetch from the store.",
                   st.fetches)
    yield _counter("pagein_store_fetched_bytes_total",
                   "Bytes fetched from the store (as stored: compressed).", st.fetched_bytes)
    yield _gauge("pagein_store_cache_memory_bytes",
                 "Bytes the serving workers' memory caches hold now.", st.cache_memory_bytes)
    latency = HistogramMetricFamily("pagein_store_fetch_latency_seconds",
                                    "Time one chunk fetch from the store took.")
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip([*FETCH_BUCKETS_S, None], st.fetch_buckets, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound is None else f"{bound:g}", cumulative))
    latency.add_metric([], buckets, st.fetch_seconds_sum)
    yield latency


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


#: What the metrics read at each scrape: a server's :meth:`~pagein.serve.server.Server.sample`.
Sampler = Callable[[], ServerSample]


def _registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(sample: Sampler) -> str:
    """The endpoint's text for ``sample`` now (Prometheus text format 0.0.4)."""
    return generate_latest(_registry(ServerCollector(sample))).decode()


class FleetCollector(Collector):
    """The metrics of every snapshot one daemon serves (:mod:`pagein.serve.fleet`), on
    one endpoint: the same families as :class:`ServerCollector`, each series labelled
    ``snapshot`` with the snapshot's name."""

    def __init__(self, samples: Callable[[], list[tuple[str, ServerSample]]]) -> None:
        self._samples = samples

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for name, sample in self._samples():
            for m in ServerCollector(lambda s=sample: s).collect():  # type: ignore[misc]
                out = merged.get(m.name)
                if out is None:
                    out = merged[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
                out.samples += [s._replace(labels={"snapshot": name, **s.labels})
                                for s in m.samples]
        yield from merged.values()


class _Quiet(WSGIRequestHandler):
    # A scraper that connects and sends nothing (or a byte a minute) is dropped after
    # this long instead of holding its thread forever; request lines and headers are
    # bounded by http.server (64 KiB, 100 headers).
    timeout = SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scraper every 15 s is not news."""


class _Threading(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow scraper does not hold up the next."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Say nothing on stderr: a scraper that hung up early is not an error of ours."""


class MetricsEndpoint:
    """Serve ``http://ADDRESS:PORT/metrics`` from a thread; any other path is a 404.

    Binds at once (so a bad ``--metrics-address`` fails before any VMM can connect),
    answers from :meth:`serve` on. Raises :class:`PageinError` naming the flags when
    the address cannot be bound.
    """

    def __init__(self, address: str, port: int) -> None:
        self._metrics: Callable[..., list[bytes]] | None = None

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO") == "/metrics" and self._metrics is not None:
                return self._metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: pagein serves its metrics at /metrics only\n"]

        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)[0][0]
            cls = type("_Bound", (_Threading,), {"address_family": family})
            self._httpd: WSGIServer = make_server(address, port, app, cls,
                                                  handler_class=_Quiet)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on --metrics-address {address} "
                              f"--metrics-port {port}: {e.strerror or e}") from e
        self.port: int = self._httpd.server_port
        self._thread: threading.Thread | None = None

    def serve(self, collector: Collector) -> None:
        """Answer scrapes with what ``collector`` reads (a :class:`ServerCollector` or a
        :class:`FleetCollector`), from a thread of its own."""
        self._metrics = make_wsgi_app(_registry(collector))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="pagein-metrics")
        self._thread.start()

    def close(self) -> None:
        """Stop answering and close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
