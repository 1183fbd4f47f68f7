"""The flattened index of a snapshot chain: which layer's file holds each page.

A chain of diff layers is read through one index, so a fault costs one lookup and one
read whatever the depth. The index is a list of maximal runs of pages with one owner::

    run i   pages [start_i, start_i + length_i)   owner_i
            owner 0 is the full snapshot at the bottom, owner k the k-th diff above it,
            ZERO (0xFFFF) pages that read as zeros (a hole in the owner's file)

Each layer file records the index of the chain up to and including itself, built when
the diff is written (:meth:`ChainIndex.with_layer`: the parent's index with the new
layer's pages put on top), so opening a chain of any depth reads one index instead of
merging every layer's page bitmap. Encoded (:meth:`ChainIndex.encode`) as base64 of a
zlib stream of ``length[n]`` (u64 little-endian, pages) then ``owner[n]`` (u16).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagein.sys.mapping import PAGE_SIZE

__all__ = ["ZERO", "ChainIndex"]

ZERO = 0xFFFF                  # the owner of pages that read as zeros
Bits = npt.NDArray[np.bool_]
_RUN_BYTES = 8 + 2             # u64 length + u16 owner


@dataclass(frozen=True, slots=True)
class ChainIndex:
    """Maximal runs of pages with one owner, covering ``npages`` pages in file order."""

    npages: int
    starts: npt.NDArray[np.int64]      # first page of each run; starts[0] == 0
    owners: npt.NDArray[np.uint16]

    def __len__(self) -> int:
        return int(self.starts.size)

    @classmethod
    def from_owners(cls, owner: npt.NDArray[np.uint16]) -> ChainIndex:
        """The runs of a per-page owner array (the inverse of :meth:`owner_per_page`)."""
        if owner.size == 0:
            raise ValueError("a chain index needs at least one page")
        cuts = np.flatnonzero(owner[1:] != owner[:-1]) + 1
        starts = np.concatenate((np.zeros(1, np.int64), cuts.astype(np.int64)))
        return cls(int(owner.size), starts, owner[starts].astype(np.uint16))

    @classmethod
    def of_full(cls, npages: int, extents: list[tuple[int, int]]) -> ChainIndex:
        """The index of a full snapshot alone: its data extents (byte ``(offset, length)``,
        from :func:`~pagein.snapshot.raw.data_extents`) owned by layer 0, holes ZERO."""
        owner = np.full(npages, ZERO, dtype=np.uint16)
        for offset, length in extents:
            owner[offset // PAGE_SIZE: -(-(offset + length) // PAGE_SIZE)] = 0
        return cls.from_owners(owner)

    def owner_per_page(self) -> npt.NDArray[np.uint16]:
        """One owner per page (``npages`` u16): the index expanded."""
        lengths = np.diff(np.concatenate((self.starts, [self.npages])))
        return np.repeat(self.owners, lengths)

    def with_layer(self, depth: int, pages: Bits, zero: Bits) -> ChainIndex:
        """This index with a layer at ``depth`` on top: it owns ``pages``, and those of
        them in ``zero`` (all-zero, left as holes in its file) read as zeros."""
        if pages.size != self.npages or zero.size != self.npages:
            raise ValueError(f"a layer of {pages.size} pages on a chain of {self.npages}")
        if not 0 < depth < ZERO:
            raise ValueError(f"layer depth {depth} is not in 1..{ZERO - 1}")
        owner = self.owner_per_page()
        owner[pages] = depth
        owner[pages & zero] = ZERO
        return ChainIndex.from_owners(owner)

    def runs(self) -> list[tuple[int, int, int]]:
        """``(offset, length, owner)`` in bytes, in file order."""
        ends = np.concatenate((self.starts[1:], [self.npages]))
        return [(int(s) * PAGE_SIZE, int(e - s) * PAGE_SIZE, int(o))
                for s, e, o in zip(self.starts, ends, self.owners, strict=True)]

    def run_of(self, offset: int) -> int:
        """The number of the run holding byte ``offset``."""
        return int(np.searchsorted(self.starts, offset // PAGE_SIZE, side="right")) - 1

    def run_end(self, i: int) -> int:
        """The byte offset where run ``i`` ends."""
        end = int(self.starts[i + 1]) if i + 1 < len(self) else self.npages
        return end * PAGE_SIZE

    def max_owner(self) -> int:
        """The deepest layer that owns a page (0 when only the full snapshot does)."""
        data = self.owners[self.owners != ZERO]
        return int(data.max()) if data.size else 0

    def encode(self) -> str:
        lengths = np.diff(np.concatenate((self.starts, [self.npages]))).astype("<u8")
        raw = lengths.tobytes() + self.owners.astype("<u2").tobytes()
        return base64.b64encode(zlib.compress(raw, 1)).decode()

    @classmethod
    def decode(cls, text: object, runs: object, npages: int) -> ChainIndex:
        """Read what :meth:`encode` wrote; ``ValueError`` saying what is wrong otherwise.

        Bounded: at most one run per page, and the stream is inflated no further than
        ``runs`` runs need.
        """
        if isinstance(runs, bool) or not isinstance(runs, int) or not 0 < runs <= npages:
            raise ValueError(f"index.runs is {runs!r}, not a count in 1..{npages}")
        want = runs * _RUN_BYTES
        if not isinstance(text, str):
            raise ValueError("index.data is not base64 text")
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(base64.b64decode(text, validate=True), want + 1)
            complete = inflate.eof and not inflate.unconsumed_tail
        except (binascii.Error, TypeError, ValueError, zlib.error):
            raise ValueError("index.data is not base64 of a zlib stream") from None
        if len(raw) != want or not complete:
            raise ValueError(f"index.data holds {len(raw)}{'' if complete else '+'} bytes, "
                             f"{want} expected for {runs} runs")
        lengths = np.frombuffer(raw, "<u8", runs).astype(np.int64)
        owners = np.frombuffer(raw, "<u2", runs, offset=runs * 8).astype(np.uint16)
        if (lengths <= 0).any() or int(lengths.sum(dtype=np.uint64)) != npages:
            raise ValueError(f"index runs do not cover the {npages} pages once each")
        if (owners[1:] == owners[:-1]).any():
            raise ValueError("index runs are not maximal (two neighbours have one owner)")
        starts = np.concatenate((np.zeros(1, np.int64), np.cumsum(lengths)[:-1]))
        return cls(npages, starts, owners)
