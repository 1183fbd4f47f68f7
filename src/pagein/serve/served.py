"""What a server serves: the page source its options name, the working set bound to it,
and a fresh strategy per VM. The supervisor and every serving worker open it the same
way (:func:`open_served`), so a bad working set or source fails before listening.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagein.errors import PageinError
from pagein.serve.guard import SourceGuard
from pagein.serve.options import ServeOptions
from pagein.serve.strategies import Strategy, StrategyName, make_strategy
from pagein.snapshot import workingset
from pagein.snapshot.chain import ChainSource
from pagein.snapshot.open import open_source
from pagein.snapshot.raw import RawFileSource
from pagein.snapshot.source import PageSource, SourceStats
from pagein.snapshot.store.source import ChunkedSource

__all__ = ["Served", "open_served"]

log = logging.getLogger("pagein.serve")

_NEEDS_WS = (StrategyName.WORKING_SET, StrategyName.REAP)


@dataclass(slots=True)
class Served:
    """An open source (a working-set overlay when one is used), its recorded extents and
    the guard that notices the memory file changing (:mod:`pagein.serve.guard`; started
    by whoever serves from it)."""

    source: PageSource
    base: PageSource
    extents: list[tuple[int, int]] | None
    options: ServeOptions
    guard: SourceGuard

    @classmethod
    def of(cls, source: PageSource, options: ServeOptions) -> Served:
        """Serve a source object the caller opened (and closes): with ``workers=0``, any
        :class:`PageSource`, e.g. one a library user wrote."""
        return cls(source, source, None, options, SourceGuard(source))

    def file_path(self) -> str | None:
        """The local memory file served (None for a store source): identity checks
        compare it with the VMM's (:mod:`pagein.serve.identity`)."""
        return self.base.path if isinstance(self.base, RawFileSource) else None

    def layer_sha256(self) -> str | None:
        """The SHA-256 of the served chain's top ``layer`` file (None: not a diff chain):
        identity checks compare it with the VMM's (:mod:`pagein.serve.identity`)."""
        return self.base.top_layer_sha256 if isinstance(self.base, ChainSource) else None

    def strategy(self) -> Strategy:
        """A fresh strategy for one VM (sessions never share one)."""
        o = self.options
        return make_strategy(o.strategy, readahead_bytes=o.readahead_bytes,
                             working_set=self.extents, then=o.then)

    def source_stats(self) -> SourceStats | None:
        """The store source's cache and fetch counters (None for a local file)."""
        return self.base.stats()

    def close(self) -> None:
        self.guard.close()
        self.source.close()
        if self.base is not self.source:
            self.base.close()


def _stored_working_set(opts: ServeOptions, source: PageSource) -> str:
    """Return the local path of the working set pushed with a store snapshot, or raise."""
    if not isinstance(source, ChunkedSource):
        raise PageinError(f"--strategy {opts.strategy.value} needs --working-set FILE "
                          "(recorded with pagein serve --record FILE)")
    path = source.working_set_path()
    if path is None:
        raise PageinError(f"--strategy {opts.strategy.value}: snapshot {source.describe()} has "
                          "no working set in its store: pass --working-set FILE or push one "
                          "with 'pagein store push-working-set NAME FILE --store URL'")
    return path


def open_served(opts: ServeOptions, *, warm: bool = False) -> Served:
    """Open the source of ``opts`` and check its working set against it.

    ``warm``: for a store source, prefetch the chunks behind the recorded pages in touch
    order into the host cache (the supervisor does it once for every worker).
    """
    needs_ws = opts.strategy in _NEEDS_WS
    if opts.working_set is not None and not needs_ws:
        raise PageinError("--working-set is used by --strategy working-set or reap only")
    base = open_source(opts.source, **opts.store_options())
    try:
        source: PageSource = base
        extents = None
        ws_path = opts.working_set
        if needs_ws and ws_path is None:
            ws_path = _stored_working_set(opts, base)
            if warm:
                log.info("using the working set stored with %s", base.describe())
        if ws_path is not None:
            # Checked against this snapshot before listening: a bad file never serves.
            ws = workingset.load(ws_path, base)
            extents = ws.extents()
            if warm and isinstance(base, ChunkedSource):
                # The pages themselves come from the working-set file, but readahead
                # around them and the rest of their chunks then hit the host cache.
                for offset, length in extents:
                    base.prefetch(offset, length)
            source = workingset.WorkingSetSource(base, ws)
        served = Served(source, base, extents, opts.with_(working_set=ws_path),
                        SourceGuard(base))
        try:
            served.strategy()  # a bad --readahead-size fails before listening
        except ValueError as e:
            raise PageinError(f"--strategy {opts.strategy.value}: {e}") from e
    except BaseException:
        base.close()
        raise
    return served
