"""A VM's address space as the fault server sees it: regions, the live extents where they
are mapped, and what REMOVE, UNMAP and REMAP events do to them.

A region is registered at ``base_address`` in the VMM. ``mremap`` moves parts of it
(UFFD_EVENT_REMAP) and ``munmap`` takes parts away (UFFD_EVENT_UNMAP), so the live
address ranges are kept as :class:`Extent` values: ``length`` bytes at ``address``
holding the region's bytes from ``rel`` on. Every page computation goes through
:meth:`AddressSpace.locate` and :meth:`AddressSpace.pages_of` so it is written once.

Events translate to page ranges of regions (:class:`PageRange`), which the session
applies to the serving state (:mod:`pagein.serve.state`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pagein.serve.firecracker import Region

__all__ = ["AddressSpace", "Extent", "Location", "PageRange"]


@dataclass(frozen=True, slots=True)
class Extent:
    """A live address range and the region bytes mapped there (moves on REMAP)."""

    address: int
    length: int
    region: int
    rel: int  # byte offset inside the region

    @property
    def end(self) -> int:
        return self.address + self.length


@dataclass(frozen=True, slots=True)
class Location:
    """Where a faulting address falls: its region, page, page address, pages to the
    end of its extent (the faulting page included)."""

    region: int
    page: int
    page_address: int
    pages_left: int


@dataclass(frozen=True, slots=True)
class PageRange:
    """Pages ``[first, first+count)`` of region ``region``."""

    region: int
    first: int
    count: int


class AddressSpace:
    """The regions of one VM and where they are mapped now. One writer (the session)."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = tuple(regions)
        self._set(Extent(r.base_address, r.size_bytes, i, 0) for i, r in enumerate(regions))

    def _set(self, extents: Iterator[Extent] | list[Extent]) -> None:
        self.extents: tuple[Extent, ...] = tuple(sorted(extents, key=lambda e: e.address))
        self._starts = [e.address for e in self.extents]

    def set_extents(self, extents: list[tuple[int, int, int, int]]) -> None:
        """Replace the live extents (``(address, length, region, rel)``, as saved)."""
        self._set([Extent(*e) for e in extents])

    def extent_tuples(self) -> list[tuple[int, int, int, int]]:
        """The extents as ``(address, length, region, rel)`` (what the native core takes)."""
        return [(e.address, e.length, e.region, e.rel) for e in self.extents]

    def locate(self, address: int) -> Location | None:
        """Return where ``address`` falls, or None outside every live extent."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        e = self.extents[i]
        if address >= e.end:
            return None
        ps = self.regions[e.region].page_size
        page = (e.rel + address - e.address) // ps
        page_address = e.address + page * ps - e.rel
        return Location(e.region, page, page_address, (e.end - page_address) // ps)

    def pieces(self, region: int, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(address, page, count)`` for the live parts of a page range."""
        ps = self.regions[region].page_size
        lo, hi = first * ps, (first + count) * ps
        for e in self.extents:
            if e.region != region:
                continue
            a, b = max(lo, e.rel), min(hi, e.rel + e.length)
            if a < b:
                yield e.address + a - e.rel, a // ps, (b - a) // ps

    def _overlaps(self, start: int, end: int) -> Iterator[tuple[Extent, int, int]]:
        for e in self.extents:
            a, b = max(start, e.address), min(end, e.end)
            if a < b:
                yield e, a, b

    def pages_of(self, start: int, end: int, *, whole: bool) -> list[PageRange]:
        """The region pages an address range covers: only pages wholly inside it when
        ``whole`` (a REMOVE of part of a huge page voids nothing), else every page it
        touches."""
        out: list[PageRange] = []
        for e, a, b in self._overlaps(start, end):
            ps = self.regions[e.region].page_size
            lo, hi = e.rel + a - e.address, e.rel + b - e.address
            p0 = (lo + ps - 1) // ps if whole else lo // ps
            p1 = hi // ps if whole else (hi + ps - 1) // ps
            if p1 > p0:
                out.append(PageRange(e.region, p0, p1 - p0))
        return out

    def unmap(self, start: int, end: int) -> list[PageRange]:
        """Apply UNMAP: return the pages that are gone (nothing to fill there any more)."""
        gone = self.pages_of(start, end, whole=False)
        self._cut(start, end)
        return gone

    def remap(self, old: int, new: int, length: int) -> None:
        """Apply REMAP: the bytes at ``[old, old+length)`` now live at ``new``."""
        moved = [Extent(new + a - old, b - a, e.region, e.rel + a - e.address)
                 for e, a, b in self._overlaps(old, old + length)]
        self._cut(old, old + length)
        self._set([*self.extents, *moved])

    def _cut(self, start: int, end: int) -> None:
        out: list[Extent] = []
        for e in self.extents:
            if e.end <= start or e.address >= end:
                out.append(e)
                continue
            if e.address < start:
                out.append(Extent(e.address, start - e.address, e.region, e.rel))
            if e.end > end:
                out.append(Extent(end, e.end - end, e.region, e.rel + end - e.address))
        self._set(out)
