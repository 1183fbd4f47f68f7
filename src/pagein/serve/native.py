"""The native fault engine: :mod:`pagein.serve._core` (C, GIL released) behind the
:class:`~pagein.serve.engine.Engine` interface.

The core copies straight from the source's mapping, so it serves sources whose every
byte is readable in place (:meth:`~pagein.snapshot.source.PageSource.address_map`: a raw
memory file, with a working set's recorded pages preferred); for other sources the
session uses the Python engine, which reads into a bounce buffer. With a page cache
(``--share-pages``) it writes those bytes into the cache once and maps them with
``UFFDIO_CONTINUE`` (rule R8 of ``_core.c``).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator, Sequence

from pagein.errors import UffdError
from pagein.serve import _core
from pagein.serve.bitmap import Bitmap
from pagein.serve.crash import CrashPoint, claim
from pagein.serve.engine import EventTuple, Unserved
from pagein.serve.firecracker import Region
from pagein.serve.pagecache import CacheFiller
from pagein.serve.stats import CounterBlock
from pagein.sys.mapping import HUGE_PAGE_SIZE, Mapping

__all__ = ["NativeEngine"]


class NativeEngine:
    """Serve one VM's faults in C. One thread uses it at a time."""

    def __init__(self, uffd_fd: int, regions: Sequence[Region], filled: Sequence[Bitmap],
                 discarded: Sequence[Bitmap], holes: Sequence[Bitmap | None],
                 counters: CounterBlock, base_address: int,
                 overlay: Sequence[tuple[int, int, int]],
                 extents: Sequence[tuple[int, int, int, int]], readahead_pages: Sequence[int],
                 chunk_bytes: int, record: bool, journal: memoryview | None = None,
                 pagemap_fd: int = -1, tripwire: bytearray | None = None,
                 cache: CacheFiller | None = None) -> None:
        # hugetlbfs has no zero page: zeros are copied from memory never written.
        self._zeros = Mapping.anonymous(HUGE_PAGE_SIZE)
        core = None
        try:
            core = self._core = _core.Core(
                uffd_fd, [(r.offset, r.size_bytes, r.page_size) for r in regions],
                [b.buffer for b in filled], [b.buffer for b in discarded],
                [None if h is None else h.buffer for h in holes], counters.words,
                base_address, list(overlay), self._zeros.address, list(readahead_pages),
                chunk_bytes, record, journal, pagemap_fd, tripwire,
                None if cache is None else cache.core_args())
            core.set_extents(sorted(extents))
            for point in (CrashPoint.FILL, CrashPoint.EVENT):  # 0 unless a test asks
                left = claim(point)
                if left:
                    core.set_crash(int(point), left)
        except BaseException:
            if core is not None:
                core.close()
            self._zeros.close()
            raise

    @property
    def deferred(self) -> int:
        return self._core.deferred

    def set_extents(self, extents: Sequence[tuple[int, int, int, int]]) -> None:
        self._core.set_extents(sorted(extents))

    def run(self, stop_fd: int, sock_fd: int,
            timeout_ms: int) -> tuple[int, list[EventTuple], list[Unserved]]:
        with _as_uffd_error():
            return self._core.run(stop_fd, sock_fd, timeout_ms)

    def fill(self, region: int, first_page: int, pages: int, cause: int,
             dontwake: bool) -> bool:
        with _as_uffd_error():
            return self._core.fill(region, first_page, pages, cause, dontwake)

    def drain(self, timeout_ms: int) -> list[EventTuple]:
        with _as_uffd_error():
            return self._core.drain(timeout_ms)

    def applied(self) -> None:
        self._core.applied()

    def wake_installed(self) -> None:
        with _as_uffd_error():
            self._core.wake_installed()

    def wake(self, start: int, length: int) -> None:
        with _as_uffd_error():
            self._core.wake(start, length)

    def take_records(self) -> tuple[bytes, bytes]:
        return self._core.take_records()

    def close(self) -> None:
        self._core.close()
        self._zeros.close()


@contextlib.contextmanager
def _as_uffd_error() -> Iterator[None]:
    """The core raises OSError naming the ioctl and range; callers expect UffdError."""
    try:
        yield
    except OSError as e:
        raise UffdError("fault core", e.errno or errno.EIO, 0, 0, str(e.strerror or e)) from None
