"""What ``pagein store push`` reads: a raw memory file, or a chain of diff layers.

A directory is a diff snapshot layer (:mod:`pagein.snapshot.chain`): its chain is
resolved, checked and flattened, and the flattened bytes are pushed. The store is
content-addressed, so the chunks a layer shares with its parent's push (every chunk
with no changed page) are already stored and only the changed chunks are uploaded;
the manifest records the chain (each layer's state SHA-256) and serves it as one
flat snapshot, so a fault costs one chunk lookup whatever the depth.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from pagein.errors import SourceError
from pagein.snapshot.chain import STATE_FILE, ChainSource, file_sha256
from pagein.snapshot.source import PageSource
from pagein.snapshot.store.chunker import RawChunk, is_zero, iter_chunks

__all__ = ["PushInput"]


class PushInput:
    """The bytes to push from ``path``: chunks in order, and reads by offset."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._chain = ChainSource(self.path) if os.path.isdir(self.path) else None
        if self._chain is not None:
            self.size = self._chain.size
            self.layers = tuple(file_sha256(os.path.join(layer.directory, STATE_FILE))
                                for layer in self._chain.chain.layers)
        else:
            try:
                self.size = os.stat(self.path).st_size
            except OSError as e:
                raise SourceError(f"cannot read memory file {self.path}: {e.strerror}") from e
            self.layers = ()

    def chunks(self, chunk_size: int) -> Iterator[RawChunk]:
        """Every chunk in order; all-zero ones carry ``data=None``."""
        if self._chain is None:
            yield from iter_chunks(self.path, chunk_size)
            return
        for index in range(-(-self.size // chunk_size)):
            offset = index * chunk_size
            length = min(chunk_size, self.size - offset)
            if self._chain.zero_extents(offset, length) == [(offset, length)]:
                yield RawChunk(index, None, length)
                continue
            data = self.read(offset, length)
            yield RawChunk(index, None if is_zero(data) else data, length)

    def read(self, offset: int, length: int) -> bytes:
        if self._chain is not None:
            buf = bytearray(length)
            self._chain.read_into(offset, memoryview(buf))
            return bytes(buf)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def page_source(self) -> PageSource:
        """A page source of the same bytes (to check a working set against); caller closes."""
        from pagein.snapshot.raw import RawFileSource

        return ChainSource(self.path) if self._chain is not None else RawFileSource(self.path)

    def close(self) -> None:
        if self._chain is not None:
            self._chain.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
