"""The raw memory file: Firecracker's ``mem_file_path`` layout, served zero-copy.

Layout (no header; each guest memory region's bytes follow the previous one's)::

    offset 0                 region 0 (size_0 bytes)
    offset size_0            region 1 (size_1 bytes)
    ...                      (the handshake's ``offset`` field says where each starts)

The file may be sparse: holes (found with ``lseek(SEEK_DATA/SEEK_HOLE)``) read as zeros,
and the fault server maps the kernel's zero page there instead of copying.

The file is mapped read-only and shared, so :meth:`RawFileSource.address_of` hands the
fault server an address inside the page cache: ``UFFDIO_COPY`` then copies straight from
the page cache into the guest with no intermediate buffer.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import threading

from pagein._abi.mman import Prot
from pagein.errors import MappingError, SnapshotFormatError, SourceError
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping

__all__ = ["RawFileSource", "data_extents"]


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Return the ``(offset, length)`` data extents of a file; everything else is a hole.

    Uses ``lseek(SEEK_DATA)``/``lseek(SEEK_HOLE)`` (``lseek(2)``). A file system without
    hole reporting says the whole file is data, which is correct, only slower to serve.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is one hole
                break
            if e.errno == errno.EINVAL:  # SEEK_DATA unsupported here: all data
                return [(0, size)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        out.append((start, end - start))
        pos = end
    return out


class RawFileSource(PageSource):
    """Serve pages of a raw memory file through a read-only shared mapping of it.

    Raises :class:`~pagein.errors.SourceError` when the file is missing or unreadable and
    :class:`~pagein.errors.SnapshotFormatError` when it is empty. Safe to use from several
    threads: reads use ``pread`` and the mapping is never written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._fd = self._open(self.path)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise SourceError(f"snapshot memory file {self.path} is a directory: pass the "
                                  "memory file itself")
            self._size = st.st_size
            if self._size == 0:
                raise SnapshotFormatError(
                    f"snapshot memory file {self.path} is empty: give the memory file the "
                    "VMM wrote when it created the snapshot")
            # Holes are found once: a fault then needs one bisect, not two lseek calls.
            extents = data_extents(self._fd, self._size)
            self._data_starts = [s for s, _ in extents]
            self._data_ends = [s + n for s, n in extents]
            length = -(-self._size // PAGE_SIZE) * PAGE_SIZE
            try:
                self._map: Mapping | None = Mapping.of_fd(self._fd, length, shared=True,
                                                          prot=Prot.READ)
            except MappingError as e:
                raise SourceError(f"cannot map snapshot memory file {self.path}: {e}") from e
        except BaseException:
            os.close(self._fd)
            raise

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise SourceError(f"snapshot memory file {path} does not exist: give the "
                              "memory file the VMM wrote with the snapshot") from e
        except PermissionError as e:
            raise SourceError(f"snapshot memory file {path} is not readable by this user: "
                              "fix its permissions or run as its owner") from e
        except OSError as e:
            raise SourceError(f"cannot open snapshot memory file {path}: {e.strerror}") from e

    @property
    def size(self) -> int:
        return self._size

    def describe(self) -> str:
        return self.path

    def _check(self, offset: int, length: int) -> None:
        if self._fd < 0:
            raise SourceError(f"snapshot memory file {self.path} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise SourceError(
                f"range 0x{offset:x}-0x{offset + length:x} is outside snapshot memory file "
                f"{self.path} of 0x{self._size:x} bytes")

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from the file with ``pread`` (``preadv(2)``); never returns short."""
        self._check(offset, len(buf))
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as e:
                raise SourceError(f"reading {self.path} at 0x{offset + done:x} failed: "
                                  f"{e.strerror}") from e
            if n == 0:
                raise SourceError(f"{self.path} ended at 0x{offset + done:x} while reading "
                                  f"0x{offset:x}-0x{offset + len(buf):x}: was it truncated?")
            done += n

    def address_of(self, offset: int, length: int) -> int | None:
        """Return the address of the range inside the read-only file mapping.

        Safety: the address is valid until :meth:`close`; it must only be read (a write
        raises SIGSEGV) and the range must lie inside the file (checked here).
        """
        self._check(offset, length)
        return None if self._map is None else self._map.address + offset

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Return the holes inside ``[offset, offset+length)`` as ``(offset, length)``."""
        self._check(offset, length)
        end = offset + length
        out: list[tuple[int, int]] = []
        # The first data extent that ends after `offset`.
        i = bisect.bisect_right(self._data_ends, offset)
        pos = offset
        while pos < end:
            if i >= len(self._data_starts):
                out.append((pos, end - pos))
                break
            ds, de = self._data_starts[i], self._data_ends[i]
            if ds > pos:
                out.append((pos, min(ds, end) - pos))
            pos = max(pos, de)
            i += 1
        return out

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to read the range into the page cache (``posix_fadvise WILLNEED``)."""
        if self._fd >= 0:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Unmap and close the file (idempotent)."""
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
