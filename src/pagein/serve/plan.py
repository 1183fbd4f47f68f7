"""Background planning: a strategy's plan of spans, filled in bounded chunks.

The session calls :meth:`Planner.step` once per turn of its loop, after the faults that
turn read and only while no fault is deferred, so a fault never queues behind more than
one chunk: a demand fault jumps the queue of a working-set prefetch. A chunk may gather
many small spans; it is installed with ``DONTWAKE`` and woken with one ``UFFDIO_WAKE`` per
contiguous piece (the engine's ``wake_installed``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from pagein.errors import SourceError
from pagein.serve.cause import Cause
from pagein.serve.crash import CrashPoint, claim, countdown
from pagein.serve.engine import Engine
from pagein.serve.firecracker import Region
from pagein.serve.stats import CounterBlock
from pagein.serve.strategies import Span
from pagein.snapshot.source import PageSource

__all__ = ["MAX_SPANS", "Planner"]

log = logging.getLogger("pagein.serve")

#: Spans per background chunk (a scattered working set is mostly one-page spans). Fewer
#: let a demand fault in sooner, but a vCPU that runs into the prefetch frontier then
#: blocks once per chunk (~100 us each on kvm_pvm): measured, 64 lost to 256.
MAX_SPANS = 256


class Planner:
    """Walk one plan; :meth:`step` fills the next chunk of it."""

    def __init__(self, plan: Iterable[Span], regions: Sequence[Region], source: PageSource,
                 counters: CounterBlock, chunk_bytes: int) -> None:
        self._plan: Iterator[Span] = iter(plan)
        self._span: Span | None = None
        self.regions = tuple(regions)
        self.source = source
        self.counters = counters
        self.chunk = chunk_bytes
        self._crash = claim(CrashPoint.PREFETCH)  # 0 unless a recovery test asks

    def busy(self) -> bool:
        """Whether any span is left."""
        if self._span is None:
            self._span = next(self._plan, None)
        return self._span is not None

    def step(self, engine: Engine) -> bool:
        """Fill one chunk of the plan (populated pages are skipped); False on EAGAIN
        (the engine reads the pending event on its next run; filled pages stay filled)."""
        budget, spans = self.chunk, MAX_SPANS
        try:
            while budget > 0 and spans and self.busy() and self._span is not None:
                spans -= 1
                s = self._span
                ps = self.regions[s.region].page_size
                n = min(s.pages, max(1, budget // ps))
                if not engine.fill(s.region, s.first_page, n, s.cause, True):
                    self.counters.add("retries")
                    return False
                budget -= n * ps
                if self._crash:  # filled, not yet woken, more of the chunk to come
                    self._crash = countdown(self._crash, CrashPoint.PREFETCH)
                rest = s.pages - n
                self._span = Span(s.region, s.first_page + n, rest, s.cause) if rest else None
                if rest and s.cause is Cause.BACKGROUND:
                    self._hint(s.region, s.first_page + n, min(rest, max(1, self.chunk // ps)))
        finally:
            engine.wake_installed()
        return True

    def _hint(self, region: int, page: int, pages: int) -> None:
        r = self.regions[region]
        try:
            self.source.prefetch(r.page_offset(page), pages * r.page_size)
        except SourceError as e:
            log.debug("prefetch hint failed: %s", e)
