"""Cut a memory file into fixed-size chunks; encode, name and verify one chunk.

A chunk object in the store is one zstd frame (with its content size recorded) of
the chunk's uncompressed bytes; its name is the BLAKE2b-256 hex digest of those
uncompressed bytes. All-zero chunks are never stored: the manifest marks them null.

:func:`decode_chunk` is the one place a stored chunk becomes bytes, and it checks
the digest first, so no caller can hand out bytes that were not verified.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from pagein.errors import IntegrityError

__all__ = ["RawChunk", "decode_chunk", "digest", "encode_chunk", "is_zero", "iter_chunks"]

_ZSTD_LEVEL = 3
_local = threading.local()


@dataclass(frozen=True, slots=True)
class RawChunk:
    """One chunk read from a file: its index and bytes (None when all zero)."""

    index: int
    data: bytes | None
    length: int


def digest(data: bytes | memoryview) -> str:
    """Return the content name of ``data``: BLAKE2b-256, lowercase hex."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def is_zero(data: bytes) -> bool:
    """Return True when every byte of ``data`` is zero."""
    # bytes == bytes is one memcmp; keep one zero block per length seen (a chunk
    # size and perhaps a short last chunk) instead of allocating per call.
    return data == _zeros(len(data))


@functools.lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe; one per thread, reused.
    c = getattr(_local, "compressor", None)
    if c is None:
        c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
        _local.compressor = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.decompressor = d
    return d


def encode_chunk(data: bytes) -> bytes:
    """Return the stored form of ``data``: one zstd frame with its content size."""
    out: bytes = _compressor().compress(data)
    return out


def decode_chunk(stored: bytes, expected_digest: str, length: int, what: str) -> bytes:
    """Decompress a stored chunk and check its length and digest, or raise IntegrityError.

    ``what`` names the chunk for the message (snapshot, index, object key).
    """
    try:
        data: bytes = _decompressor().decompress(stored, max_output_size=length)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {what} is not a valid zstd frame ({e}): the stored "
                             "object is corrupt; re-push the snapshot") from e
    if len(data) != length:
        raise IntegrityError(f"chunk {what} decompressed to {len(data)} bytes, expected "
                             f"{length}: the stored object is corrupt; re-push the snapshot")
    actual = digest(data)
    if actual != expected_digest:
        raise IntegrityError(f"chunk {what} has content hash {actual[:16]}…, expected "
                             f"{expected_digest[:16]}…: the stored object is corrupt; "
                             "re-push the snapshot")
    return data


def iter_chunks(path: str | os.PathLike[str], chunk_size: int) -> Iterator[RawChunk]:
    """Yield the file's chunks in order; all-zero chunks carry ``data=None``.

    Holes in a sparse file are skipped with SEEK_DATA, so a mostly-empty 8 GiB
    memory file is not read byte by byte.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        count = -(-size // chunk_size)
        index = 0
        while index < count:
            offset = index * chunk_size
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                data_at = size
            while index < count and (index + 1) * chunk_size <= data_at:
                yield RawChunk(index, None, min(chunk_size, size - index * chunk_size))
                index += 1
            if index >= count:
                break
            offset = index * chunk_size
            length = min(chunk_size, size - offset)
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"{os.fspath(path)} shrank while being read at offset {offset}")
            yield RawChunk(index, None if is_zero(data) else data, length)
            index += 1
    finally:
        os.close(fd)
