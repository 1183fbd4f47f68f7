"""The one interface every snapshot backend implements: :class:`PageSource`.

A page source answers "give me the bytes at this offset of the raw memory file" —
whether the bytes come from a local file, a sparse file, or compressed chunks in
object storage. Offsets are always offsets in Firecracker's raw memory-file layout
(regions back to back, no header).

Contract (the fault server relies on it):
- ``read_into`` fills the whole buffer or raises (:class:`~pagein.errors.SourceError`,
  :class:`~pagein.errors.IntegrityError`); it never returns short or zero-fills data it
  could not get.
- ``zero_extents`` may report ranges known to be all zeros without reading them (file
  holes, chunks left out of a store) so the server can map zero pages instead.
- Sources are safe to call from several threads.
"""

from __future__ import annotations

import abc
import bisect
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Self

#: Upper bounds (seconds) of the store fetch-latency histogram; one more bucket is +Inf.
FETCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(slots=True)
class SourceStats:
    """What a source that fetches from afar did: cache hits, fetches, their latency.

    A source reading a local file has none (:meth:`PageSource.stats` returns None).
    """

    cache_hits_memory: int = 0  # chunks found verified in this process's memory cache
    cache_hits_disk: int = 0  # chunks read from the host's disk cache
    fetches: int = 0  # chunks in neither cache, fetched from the store
    fetched_bytes: int = 0  # their stored (compressed) bytes
    cache_memory_bytes: int = 0  # bytes the memory cache holds now
    fetch_seconds_sum: float = 0.0
    fetch_buckets: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS_S) + 1))

    def observe_fetch(self, seconds: float) -> None:
        """Count one store fetch that took ``seconds``."""
        self.fetch_buckets[bisect.bisect_left(FETCH_BUCKETS_S, seconds)] += 1
        self.fetch_seconds_sum += seconds

    def add(self, other: SourceStats) -> None:
        """Accumulate ``other`` (another process's) into this one."""
        for f in fields(self):
            if f.name == "fetch_buckets":
                self.fetch_buckets = [a + b for a, b in
                                      zip(self.fetch_buckets, other.fetch_buckets, strict=True)]
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_doc(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_doc(cls, doc: dict[str, object]) -> SourceStats:
        """Read what :meth:`to_doc` wrote (ValueError when it is not that)."""
        out = cls()
        for f in fields(cls):
            value = doc.get(f.name)
            if f.name == "fetch_buckets":
                if not (isinstance(value, list) and len(value) == len(out.fetch_buckets)
                        and all(isinstance(v, int) for v in value)):
                    raise ValueError(f"source stats: bad {f.name}")
                out.fetch_buckets = list(value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                setattr(out, f.name, type(getattr(out, f.name))(value))
            else:
                raise ValueError(f"source stats: bad {f.name}")
        return out


class PageSource(abc.ABC):
    """Snapshot bytes by offset; subclasses own their files and connections."""

    #: Fetch granularity in bytes: reading less than this costs as much as reading this.
    block_size: int = 4096

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Total bytes of the memory file."""

    @abc.abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``[offset, offset+len(buf))``, or raise."""

    def address_of(self, offset: int, length: int) -> int | None:
        """Return an address in this process where the range is already readable, or None.

        A local file source returns an address inside its read-only mapping of the
        file, so a fill can copy straight from the page cache with no extra copy.
        """
        return None

    def address_map(self) -> tuple[int | None, list[tuple[int, int, int]]]:
        """Where the whole file is readable in place, for a fault core that copies without
        calling back: ``(base, overlay)``. ``base`` is the address of offset 0 when every
        byte is mapped (else None); ``overlay`` lists ``(offset, length, address)`` ranges,
        sorted and disjoint, to prefer for a read lying wholly inside one (bytes already
        in memory, e.g. a working set's).

        Safety: the addresses are valid until :meth:`close`, and read only.
        """
        return (self.address_of(0, self.size) if self.size else None), []

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Return ``(offset, length)`` pieces of the range known to be all zeros."""
        return []

    def prefetch(self, offset: int, length: int) -> None:  # noqa: B027 - optional hint
        """Hint that the range will be read soon (default: nothing)."""

    def describe(self) -> str:
        """A short human-readable name for logs (a path or URL)."""
        return type(self).__name__

    def stats(self) -> SourceStats | None:
        """Cache and fetch counters of a source that fetches from afar (None: a local one)."""
        return None

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release files and connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
