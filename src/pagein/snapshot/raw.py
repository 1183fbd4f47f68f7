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

Served bytes must be the snapshot's: a file written while it is served would put other
bytes into the guest. :meth:`RawFileSource.take_lease` takes a read lease
(``fcntl(F_SETLEASE, F_RDLCK)``): a process that opens the file for writing (or
truncates it) is held in ``open()`` until the lease is given back or
``/proc/sys/fs/lease-break-time`` passes, and the holder gets ``SIGIO``. Where no lease
can be had (the file is open for writing somewhere, a file system without leases), the
identity of the open file (``st_dev, st_ino``, size, ``mtime_ns``, ``ctime_ns``) is
compared with what it was at open. :meth:`RawFileSource.changed` says which happened.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Sequence

from pagein._abi.mman import Prot
from pagein.errors import MappingError, SnapshotFormatError, SourceError
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping

__all__ = ["RawFileSource", "data_extents"]

_Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, size, mtime_ns, ctime_ns


def _identity(st: os.stat_result) -> _Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"snapshot memory file {self.path} is not a regular file: "
                                  "pass the memory file the snapshot wrote")
            self._size = st.st_size
            self._identity = _identity(st)
            self._leased = False
            self._changed: str | None = None
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
            # O_NONBLOCK: a FIFO given by mistake must not hang the open (refused below).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            return fd
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

    # --- noticing a change of the file ------------------------------------------------

    def take_lease(self) -> str | None:
        """Take a read lease on the file; return None, or why none could be had.

        Once held, a process opening the file for writing waits in ``open()`` (up to
        ``/proc/sys/fs/lease-break-time`` seconds) and this process gets ``SIGIO``
        (``fcntl(2)``, "Leases"): install a handler first, the default one terminates.
        The lease is refused (EAGAIN) while anyone has the file open for writing, and on
        file systems without leases; :meth:`changed` then relies on the file's identity.
        """
        with self._lock:
            if self._fd < 0 or self._leased:
                return None
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as e:
                why = {errno.EAGAIN: "it is open for writing elsewhere",
                       errno.EACCES: "this user does not own it"}.get(
                           e.errno or 0, f"{e.strerror} (no leases on this file system?)")
                return f"no read lease on {self.path}: {why}"
            self._leased = True
            return None

    def release_lease(self) -> None:
        """Give the lease back (a writer waiting in ``open()`` goes on); idempotent."""
        with self._lock:
            if self._leased and self._fd >= 0:
                fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            self._leased = False

    @property
    def leased(self) -> bool:
        return self._leased

    @property
    def identity(self) -> tuple[int, int, int, int, int]:
        """``(st_dev, st_ino, size, mtime_ns, ctime_ns)`` of the file when it was opened."""
        return self._identity

    def expect(self, identity: Sequence[int]) -> None:
        """Compare with ``identity`` (another process's :attr:`identity` of this path)
        from now on: a file replaced or changed since that process opened it is then
        reported by :meth:`changed` as well."""
        dev, ino, size, mtime, ctime = (int(x) for x in identity)
        with self._lock:
            self._identity = (dev, ino, size, mtime, ctime)

    def changed(self) -> str | None:
        """Say how the file changed since it was opened, or None while it has not.

        A broken lease (a writer opened it: ``F_GETLEASE`` no longer says ``F_RDLCK``)
        or a different size, modification or status-change time of the open file. Once
        a change was seen it is reported for good, even after the lease is given back.
        """
        with self._lock:
            if self._changed is None and self._fd >= 0:
                self._changed = self._look()
            return self._changed

    def _look(self) -> str | None:
        if self._leased and fcntl.fcntl(self._fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            return "a process opened it for writing"
        now = _identity(os.fstat(self._fd))
        if now == self._identity:
            return None
        if now[:2] != self._identity[:2]:
            return "it is another file than the one pagein serve opened (replaced since)"
        size, mtime = self._identity[2], self._identity[3]
        if now[2] != size:
            return (f"its size went from 0x{size:x} to 0x{now[2]:x} bytes"
                    f"{' (truncated)' if now[2] < size else ''}")
        if now[3] != mtime:
            return "it was written (its modification time changed)"
        return "its status changed (ctime)"

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
