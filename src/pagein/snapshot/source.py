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
from types import TracebackType
from typing import Self


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

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release files and connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
