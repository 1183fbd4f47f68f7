"""Restore strategies: which pages to fill besides the one a vCPU faulted on, and when.

A strategy is data the serving mechanism reads, not a loop of its own. It answers, for
a session (one VM):

- :meth:`Strategy.on_connect`: a *prefetch plan*, an ordered iterable of :class:`Span`
  values the session fills in the background, in bounded chunks, only while no fault
  is waiting (a fault never queues behind more than one chunk);
- :attr:`Strategy.window_bytes`: the aligned readahead window the fault core fills
  around each faulting page (0: none), see :meth:`Strategy.window_pages`;
- :meth:`Strategy.blocking_plan`: spans to install before the first fault is served.

The session never fills a page twice: spans are clipped to pages not yet populated
(or discarded by a balloon) using the per-region bitmaps, so plans may overlap freely.

``working-set`` prefetches a recorded working set (:mod:`pagein.snapshot.workingset`,
written by :mod:`pagein.serve.record`): :class:`WorkingSet` takes the recorded
``(file offset, length)`` extents in the order the guest first touched them and fills
them concurrently with the running guest, then falls back to ``then`` (readahead by
default, or populate-all). ``reap`` is REAP's blocking variant, for comparison: the whole
working set is installed before the first fault is served, the rest comes on demand.

"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pagein.serve.cause import Cause
from pagein.serve.firecracker import Region

__all__ = ["OnDemand", "PopulateAll", "Readahead", "Span", "Strategy",
           "StrategyName", "Then", "WorkingSet", "make_strategy"]

DEFAULT_READAHEAD_BYTES = 256 * 1024
_MIN_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class Span:
    """Pages ``[first_page, first_page+pages)`` of region ``region`` (in its page size),
    filled for ``cause`` (BACKGROUND: a plan's bulk population; PREFETCH: a recorded
    working set)."""

    region: int
    first_page: int
    pages: int
    cause: Cause = Cause.BACKGROUND


class StrategyName(enum.Enum):
    ON_DEMAND = "on-demand"
    READAHEAD = "readahead"
    POPULATE_ALL = "populate-all"
    WORKING_SET = "working-set"
    REAP = "reap"


class Then(enum.Enum):
    """What a working-set strategy does for the pages it did not record."""

    READAHEAD = "readahead"  # readahead windows around faults
    ON_DEMAND = "on-demand"  # one page per fault
    POPULATE_ALL = "populate-all"  # readahead, and fill everything else in the background


class Strategy(abc.ABC):
    """Decides what a session fills beyond the faulting page. One instance per VM."""

    name: StrategyName
    #: The aligned readahead window around each fault, in bytes (0: the faulting page only).
    window_bytes: int = 0

    def window_pages(self, region: Region) -> int:
        """The readahead window in pages of ``region`` (1: the faulting page only)."""
        return max(1, self.window_bytes // region.page_size)

    def blocking_plan(self, regions: Sequence[Region]) -> Iterable[Span]:
        """Return spans to install before the first fault is served (default: none)."""
        return ()

    def on_connect(self, regions: Sequence[Region]) -> Iterable[Span]:
        """Return the background prefetch plan for these regions (default: none)."""
        return ()


class OnDemand(Strategy):
    """One page per fault, nothing else."""

    name = StrategyName.ON_DEMAND


class Readahead(Strategy):
    """Fill the aligned window of ``window_bytes`` around each fault.

    Alignment keeps windows from overlapping, so sequential access costs one fault per
    window. Hugepage regions use windows of at least one page.
    """

    name = StrategyName.READAHEAD

    def __init__(self, window_bytes: int = DEFAULT_READAHEAD_BYTES) -> None:
        if window_bytes <= 0 or window_bytes & (window_bytes - 1):
            raise ValueError(f"readahead size {window_bytes} must be a power of two in bytes")
        if window_bytes < _MIN_WINDOW:
            # A sub-page window would silently behave as on-demand.
            raise ValueError(f"readahead size {window_bytes} bytes is smaller than one 4 KiB "
                             "page: give a size with a unit, e.g. 256K")
        self.window_bytes = window_bytes


class PopulateAll(Strategy):
    """Serve faults first; fill everything else in the background, region by region."""

    name = StrategyName.POPULATE_ALL

    def on_connect(self, regions: Sequence[Region]) -> Iterable[Span]:
        return [Span(i, 0, r.size_bytes // r.page_size) for i, r in enumerate(regions)]


class WorkingSet(Strategy):
    """Prefetch a recorded working set in first-touch order, then behave like ``then``.

    ``extents`` are ``(file offset, length)`` pairs in the raw memory file, in the order
    the guest first touched them when the working set was recorded. ``blocking``: REAP's
    variant, everything recorded is installed before the first fault is served.
    """

    name = StrategyName.WORKING_SET

    def __init__(self, extents: Sequence[tuple[int, int]], then: Then = Then.READAHEAD, *,
                 readahead_bytes: int = DEFAULT_READAHEAD_BYTES, blocking: bool = False) -> None:
        self.extents = list(extents)
        self.then = then
        self.blocking = blocking
        if blocking:
            self.name = StrategyName.REAP
        self.window_bytes = 0 if then is Then.ON_DEMAND else Readahead(readahead_bytes).window_bytes

    def blocking_plan(self, regions: Sequence[Region]) -> Iterable[Span]:
        return self._recorded(regions) if self.blocking else ()

    def on_connect(self, regions: Sequence[Region]) -> Iterable[Span]:
        rest: Iterable[Span] = (PopulateAll().on_connect(regions)
                                if self.then is Then.POPULATE_ALL else ())
        if self.blocking:
            return rest
        return _chain(self._recorded(regions), rest)

    def _recorded(self, regions: Sequence[Region]) -> Iterator[Span]:
        for offset, length in self.extents:
            for i, r in enumerate(regions):
                first, count = r.pages_in(offset, length)
                if count:
                    yield Span(i, first, count, Cause.PREFETCH)


def _chain(*parts: Iterable[Span]) -> Iterator[Span]:
    for part in parts:
        yield from part


def make_strategy(name: str | StrategyName, *, readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
                  working_set: Sequence[tuple[int, int]] | None = None,
                  then: Then = Then.READAHEAD) -> Strategy:
    """Build a fresh strategy by name (sessions must not share one instance)."""
    kind = StrategyName(name)
    if kind is StrategyName.ON_DEMAND:
        return OnDemand()
    if kind is StrategyName.READAHEAD:
        return Readahead(readahead_bytes)
    if kind is StrategyName.POPULATE_ALL:
        return PopulateAll()
    if working_set is None:
        raise ValueError(f"the {kind.value} strategy needs a recorded working set "
                         "(--working-set FILE, written by pagein serve --record FILE)")
    if kind is StrategyName.REAP:
        # REAP serves what it did not record one page per fault.
        return WorkingSet(working_set, Then.ON_DEMAND, blocking=True)
    return WorkingSet(working_set, then, readahead_bytes=readahead_bytes)
