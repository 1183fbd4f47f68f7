"""Counters and a fault-latency histogram, per VM and in total, for the stats file and
the metrics endpoint (:mod:`pagein.serve.metrics` renders them for Prometheus).

A session's live counters are a :class:`CounterBlock`: ``N_COUNTERS`` native 64-bit
words in the VM's shared serving state (:mod:`pagein.serve.state`), written by the fault
core of the worker serving the VM (native or Python, one writer) and read at any time by
the supervisor for the stats file and the metrics endpoint. Readers take a
:meth:`CounterBlock.snapshot`, a plain :class:`Counters` value, which is consistent
enough for monitoring (each word is read once).

Word order (the native core's ``C_*`` indices)::

    0 faults  1 pages  2 bytes_fault  3 bytes_readahead  4 bytes_background
    5 zero_pages  6 retries  7 eexist  8 removes  9 removed_bytes  10 unmaps
    11 remaps  12 collapsed  13 collapse_failed  14 latency_us_sum
    15..28 latency buckets (LATENCY_BUCKETS_US, +Inf)
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields

from pagein.snapshot.source import SourceStats

__all__ = ["COUNTER_WORDS", "LATENCY_BUCKETS_US", "N_COUNTERS", "CounterBlock", "Counters",
           "EndedTally", "ServeStats", "ServerSample", "SourceTally", "VmRow", "write_json"]

#: Upper bounds (microseconds) of the fault-latency histogram; one more bucket is +Inf.
LATENCY_BUCKETS_US = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000)
#: The scalar counters in shared-memory word order.
COUNTER_WORDS = ("faults", "pages", "bytes_fault", "bytes_readahead", "bytes_background",
                 "zero_pages", "retries", "eexist", "removes", "removed_bytes", "unmaps",
                 "remaps", "collapsed", "collapse_failed", "latency_us_sum")
LATENCY_WORD = len(COUNTER_WORDS)  # the first histogram bucket
N_COUNTERS = LATENCY_WORD + len(LATENCY_BUCKETS_US) + 1


@dataclass(slots=True)
class Counters:
    """What one session did. Bytes are split by why they were filled."""

    faults: int = 0  # page-fault messages served (duplicates included)
    pages: int = 0  # pages installed (copied or zero), any cause
    bytes_fault: int = 0  # bytes copied from the source to serve faults
    bytes_readahead: int = 0  # bytes copied around faults by the readahead strategy
    bytes_background: int = 0  # bytes copied by background population (plans)
    zero_pages: int = 0  # pages installed as zeros (holes, removed pages)
    retries: int = 0  # fills that hit EAGAIN and were deferred
    eexist: int = 0  # fills that found the page already present (woken instead)
    removes: int = 0  # REMOVE events (balloon, MADV_DONTNEED)
    removed_bytes: int = 0
    unmaps: int = 0
    remaps: int = 0
    collapsed: int = 0  # 2 MiB ranges made huge pages once wholly installed (MADV_COLLAPSE)
    collapse_failed: int = 0  # 2 MiB ranges the kernel refused to collapse
    latency_us_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))
    latency_us_sum: int = 0

    @property
    def bytes_copied(self) -> int:
        return self.bytes_fault + self.bytes_readahead + self.bytes_background

    def observe_latency(self, micros: int) -> None:
        """Count one fault served ``micros`` after it was read."""
        self.latency_us_buckets[bisect.bisect_left(LATENCY_BUCKETS_US, micros)] += 1
        self.latency_us_sum += micros

    def snapshot(self) -> Counters:
        """Return a copy (the buckets list copied too)."""
        c = Counters(**{f.name: getattr(self, f.name) for f in fields(self)})
        c.latency_us_buckets = list(self.latency_us_buckets)
        return c

    def add(self, other: Counters) -> None:
        """Accumulate ``other`` into this one."""
        for f in fields(self):
            if f.name == "latency_us_buckets":
                self.latency_us_buckets = [a + b for a, b in
                                           zip(self.latency_us_buckets,
                                               other.latency_us_buckets, strict=True)]
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["bytes_copied"] = self.bytes_copied
        d["latency_us_le"] = [*LATENCY_BUCKETS_US, "inf"]
        return d


class CounterBlock:
    """Live counters in a buffer of ``N_COUNTERS`` native uint64 words (shared memory).

    ``block.add(name, n)`` is the writer's call; :meth:`snapshot` any reader's.
    """

    __slots__ = ("words",)
    _INDEX = {name: i for i, name in enumerate(COUNTER_WORDS)}

    def __init__(self, buffer: memoryview | bytearray | None = None) -> None:
        if buffer is None:
            buffer = bytearray(N_COUNTERS * 8)
        if len(buffer) < N_COUNTERS * 8:
            raise ValueError(f"a counter block needs {N_COUNTERS * 8} bytes, got {len(buffer)}")
        self.words = memoryview(buffer)[: N_COUNTERS * 8].cast("B").cast("Q")

    def add(self, name: str, n: int = 1) -> None:
        self.words[self._INDEX[name]] += n

    def get(self, name: str) -> int:
        return int(self.words[self._INDEX[name]])

    def observe_latency(self, micros: int) -> None:
        """Count one fault served ``micros`` after it was read."""
        self.words[LATENCY_WORD + bisect.bisect_left(LATENCY_BUCKETS_US, micros)] += 1
        self.words[self._INDEX["latency_us_sum"]] += micros

    def snapshot(self) -> Counters:
        w = self.words.tolist()
        c = Counters()
        for name, value in zip(COUNTER_WORDS, w, strict=False):
            setattr(c, name, value)
        c.latency_us_buckets = w[LATENCY_WORD:N_COUNTERS]
        return c

    def release(self) -> None:
        """Drop the view (the buffer's owner may then close its mapping)."""
        self.words.release()


@dataclass(frozen=True, slots=True)
class ServeStats:
    """A summary of one restore, as :func:`pagein.serve.local.restore_lazily` reports it."""

    faults: int
    pages: int
    bytes_copied: int
    zero_pages: int
    retries: int
    eexist: int
    removes: int

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ServeStats:
        def get(key: str) -> int:
            value = d.get(key, 0)
            return value if isinstance(value, int) else 0
        return cls(get("faults"), get("pages"), get("bytes_copied"), get("zero_pages"),
                   get("retries"), get("eexist"), get("removes"))


def write_json(path: str, doc: dict[str, object]) -> None:
    """Write ``doc`` to ``path`` atomically (a temp file renamed over it)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class VmRow:
    """One VM session in the stats: its counters and how its serving went.

    ``session`` is the server's number for the session (1, 2, ... for the server's
    life): the VMM's pid names the VM in logs, but PIDs are reused, so two sessions of
    one pid are told apart by it.
    """

    session: int
    peer_pid: int
    counters: Counters
    state: str  # "active", or how the session ended
    engine: str
    worker_restarts: int
    ms_without_worker: float
    worker_pid: int | None
    ended_at: float | None = None  # time.monotonic() when it ended

    def to_dict(self) -> dict[str, object]:
        return {"session": self.session, "peer_pid": self.peer_pid, "state": self.state,
                "engine": self.engine, "worker_restarts": self.worker_restarts,
                "ms_without_worker": self.ms_without_worker, "worker_pid": self.worker_pid,
                **self.counters.to_dict()}


class EndedTally:
    """The sessions that ended: the last ``keep`` rows listed, and every one summed
    (the totals never drop, also once a session's row is no longer listed)."""

    def __init__(self, keep: int = 1000) -> None:
        self._keep = keep
        self.rows: list[VmRow] = []
        self.total = Counters()
        self.worker_restarts = 0
        self.ms_without_worker = 0.0
        self.by_end: collections.Counter[str] = collections.Counter()
        self.count = 0

    def add(self, row: VmRow) -> int:
        """Count one ended session; return how many have ended."""
        self.rows.append(row)
        del self.rows[:-self._keep]
        self.total.add(row.counters)
        self.worker_restarts += row.worker_restarts
        self.ms_without_worker += row.ms_without_worker
        self.by_end[row.state] += 1
        self.count += 1
        return self.count


@dataclass(frozen=True, slots=True)
class ServerSample:
    """Everything the metrics endpoint shows, read at once under the server's lock.

    ``total`` and the ``ended_*`` fields count every session the server ever had, also
    those whose rows are no longer listed (ended too long ago): a counter must never
    go down, so the aggregates are kept apart from the per-VM rows.
    """

    rows: tuple[VmRow, ...]  # live sessions and recently ended ones
    total: Counters  # every session, live and ended
    vm_worker_restarts: int  # per-VM worker restarts, summed over every session
    ms_without_worker: float  # summed over every session
    sessions_active: int
    sessions_ended: dict[str, int]  # by how they ended
    handshake_failures: int
    refused_peers: int
    worker_restarts: int  # workers that died while serving (one may serve many VMs)
    worker_start_failures: int
    workers: int
    engine: str
    source: SourceStats | None = None  # a store source's cache and fetches (None: a file)


class SourceTally:
    """The store source counters of every worker: the last each sent, plus those of the
    workers that have gone (kept, so the totals never drop when a worker dies)."""

    def __init__(self) -> None:
        self._live: dict[int, SourceStats] = {}
        self._gone = SourceStats()
        self._seen = False

    def update(self, worker: int, stats: SourceStats) -> None:
        self._live[worker] = stats
        self._seen = True

    def retire(self, worker: int) -> None:
        """Worker ``worker`` has gone: keep its counts, drop its cache (a gauge)."""
        last = self._live.pop(worker, None)
        if last is not None:
            self._gone.add(last)
            self._gone.cache_memory_bytes -= last.cache_memory_bytes

    def total(self) -> SourceStats | None:
        """Every worker's counts summed; None when no worker ever sent any."""
        if not self._seen:
            return None
        out = SourceStats()
        for s in (self._gone, *self._live.values()):
            out.add(s)
        return out
