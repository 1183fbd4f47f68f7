"""Kernel facts behind ``--share-pages``: clones of one snapshot share a memfd page cache.

The server fills a memfd (the snapshot's page cache) through its own MAP_SHARED
mapping; a clone maps the same memfd MAP_PRIVATE and registers it MISSING|MINOR. The
facts this machine's kernel shows (each pinned by a test below):

1. A read of a page that is in the cache raises a MINOR fault; ``UFFDIO_CONTINUE``
   maps the cache page itself, read-only: pagemap shows the clone's PTE on the same
   PFN as the server's mapping, with the file bit set (no private copy, no RSS of its
   own).
2. A write to such a page copies on write without any uffd event: the clone gets an
   anonymous page of its own, the cache page is unchanged. A first access that is a
   write raises MINOR (flagged write); after CONTINUE the write COWs the same way.
3. A page *not* in the cache raises a MISSING fault (not MINOR). Filling the cache
   (here: a write through the server's shared mapping) and then ``UFFDIO_CONTINUE``
   resolves it, and the page is shared as in 1. (``UFFDIO_COPY`` would resolve it too,
   but with a private anonymous page: exactly what sharing avoids.)
4. ``MADV_DONTNEED`` on the private mapping raises REMOVE and zaps the clone's PTEs;
   the cache keeps its page (the madvise sleeps until the handler has read the REMOVE,
   so it must not be called by the reading thread). A later read raises MINOR again,
   so a CONTINUE would hand back the snapshot bytes, not the zeros a balloon expects.
   The handler must remember the removed range and answer with ``UFFDIO_ZEROPAGE``:
   on a MAP_PRIVATE mapping the kernel treats the fill like anonymous memory and maps
   the zero page there. A page the clone had written (COWed) and then discarded reads
   the same way.
5. ``UFFDIO_CONTINUE`` of a page that is not in the cache fails with EFAULT (the
   kernel will not allocate a cache page for it): the handler must fill first.
6. Hugetlbfs (2 MiB): 1-3 hold with 2 MiB pages (``MINOR_HUGETLBFS``); there is no
   zero page, so zeros after a REMOVE are a ``UFFDIO_COPY`` of a zero buffer, which on
   a private mapping installs a private huge page of zeros and leaves the cache alone.
"""

from __future__ import annotations

import errno
import select
import threading
from collections.abc import Callable, Iterator

import pytest

from pagein._abi.mman import Advice
from pagein.errors import UffdError
from pagein.sys.mapping import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, Memfd
from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import Feature, Filled, PageFault, RegisterMode, Remove, Userfaultfd
from serve_harness import hugepages as harness_hugepages

pytestmark = pytest.mark.kernel
P = PAGE_SIZE
N = 4


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


class _Clone:
    """A MAP_PRIVATE mapping of the cache, registered MISSING|MINOR with its own uffd.

    Accesses run in a thread with the GIL released (``Mapping.read``/``write``), and
    this thread serves them: the uffd acts on this process, like a VMM's own uffd.
    """

    def __init__(self, cache: Memfd, features: Feature) -> None:
        self.map = cache.map(shared=False)
        self.uffd = Userfaultfd.open(features | Feature.EVENT_REMOVE)
        self.uffd.register(self.map.address, self.map.length,
                           RegisterMode.MISSING | RegisterMode.MINOR)

    def close(self) -> None:
        self.map.close()
        self.uffd.close()

    def access(self, run: Callable[[], object],
               resolve: Callable[[PageFault], None]) -> tuple[PageFault, object]:
        """Run ``run`` in a thread, resolve the one fault it raises; return both."""
        out: list[object] = []
        th = threading.Thread(target=lambda: out.append(run()))
        th.start()
        try:
            assert select.select([self.uffd], [], [], 5.0)[0], "no fault arrived"
            (ev,) = self.uffd.read_events()
            assert isinstance(ev, PageFault)
            resolve(ev)
        finally:
            th.join(5.0)
        assert not th.is_alive() and out, "the access never completed"
        return ev, out[0]

    def remove(self, offset: int, length: int) -> Remove:
        """MADV_DONTNEED in a thread (it sleeps until its REMOVE is read); return the event."""
        th = threading.Thread(target=lambda: self.map.madvise(Advice.DONTNEED, offset, length))
        th.start()
        try:
            assert select.select([self.uffd], [], [], 5.0)[0], "no REMOVE arrived"
            (ev,) = self.uffd.read_events()
        finally:
            th.join(5.0)
        assert isinstance(ev, Remove) and not th.is_alive()
        return ev

    def no_fault(self, run: Callable[[], object]) -> object:
        """Run ``run`` where no fault is expected (it completes without the handler)."""
        result = run()
        assert not select.select([self.uffd], [], [], 0)[0]
        return result


def _pfn(pm: Pagemap, address: int) -> tuple[bool, bool, int]:
    page = pm.pages(address, P)[0]
    return page.present, page.file_or_shared, page.pfn


@pytest.fixture
def clone() -> Iterator[tuple[Memfd, Mapping, _Clone]]:
    with Memfd.create("pagein-share-facts", N * P) as cache:
        server = cache.map()
        c = _Clone(cache, Feature.MINOR_SHMEM | Feature.MISSING_SHMEM)
        try:
            yield cache, server, c
        finally:
            c.close()
            server.close()


def test_minor_continue_maps_the_cache_page_itself(
        clone: tuple[Memfd, Mapping, _Clone]) -> None:
    _, server, c = clone
    snap = _pattern(P, 1)
    server.write(0, snap)
    ev, got = c.access(lambda: c.map.read(0, P),
                       lambda f: _check_filled(c.uffd.continue_(f.address, P)))
    assert ev.minor and not ev.write and got == snap
    with Pagemap() as pm:
        present, file_page, pfn = _pfn(pm, c.map.address)
        assert present and file_page, "the clone's page is not the cache page"
        assert pfn == _pfn(pm, server.address)[2] != 0


def test_a_write_copies_on_write_and_leaves_the_cache_alone(
        clone: tuple[Memfd, Mapping, _Clone]) -> None:
    _, server, c = clone
    snap = _pattern(2 * P, 2)
    server.write(0, snap)
    c.access(lambda: c.map.read(0, P), lambda f: _check_filled(c.uffd.continue_(f.address, P)))
    c.no_fault(lambda: c.map.write(0, b"clone"))  # COW of a mapped page: no uffd event
    # A first access that is a write: MINOR, flagged write; CONTINUE, then the COW.
    ev, _ = c.access(lambda: c.map.write(P, b"first"),
                     lambda f: _check_filled(c.uffd.continue_(f.address, P)))
    assert ev.minor and ev.write
    assert server.read(0, 2 * P) == snap, "a clone's write reached the cache"
    assert c.map.read(0, 5) == b"clone" and c.map.read(P, 5) == b"first"
    with Pagemap() as pm:
        for off in (0, P):
            present, file_page, pfn = _pfn(pm, c.map.address + off)
            assert present and not file_page and pfn != _pfn(pm, server.address + off)[2]


def test_a_page_not_in_the_cache_is_missing_and_fill_then_continue_shares_it(
        clone: tuple[Memfd, Mapping, _Clone]) -> None:
    _, server, c = clone
    snap = _pattern(P, 3)

    def fill_then_continue(f: PageFault) -> None:
        off = f.address - c.map.address
        # CONTINUE of an absent cache page is refused: the handler must fill first.
        with pytest.raises(UffdError) as e:
            c.uffd.continue_(f.address, P)
        assert e.value.errno == errno.EFAULT
        server.write(off, snap)
        _check_filled(c.uffd.continue_(f.address, P))

    ev, got = c.access(lambda: c.map.read(2 * P, P), fill_then_continue)
    assert not ev.minor and got == snap
    with Pagemap() as pm:
        present, file_page, pfn = _pfn(pm, c.map.address + 2 * P)
        assert present and file_page and pfn == _pfn(pm, server.address + 2 * P)[2]


def test_after_remove_a_read_is_minor_again_and_zeropage_gives_zeros(
        clone: tuple[Memfd, Mapping, _Clone]) -> None:
    _, server, c = clone
    snap = _pattern(2 * P, 4)
    server.write(0, snap)
    for off in (0, P):
        c.access(lambda o=off: c.map.read(o, P),  # type: ignore[misc]
                 lambda f: _check_filled(c.uffd.continue_(f.address, P)))
    c.no_fault(lambda: c.map.write(P, b"dirty"))  # page 1 COWed, page 0 shared
    rm = c.remove(0, 2 * P)
    assert rm.start == c.map.address and rm.end == c.map.address + 2 * P
    for off in (0, P):
        # The cache still holds the page, so the fault is MINOR: CONTINUE would be stale.
        ev, got = c.access(lambda o=off: c.map.read(o, P),  # type: ignore[misc]
                           lambda f: _check_filled(c.uffd.zeropage(f.address, P)))
        assert ev.minor and got == bytes(P)
    assert server.read(0, 2 * P) == snap
    with Pagemap() as pm:
        assert not _pfn(pm, c.map.address)[1], "the zero page is anonymous, not the cache's"


def _check_filled(result: object) -> None:
    assert isinstance(result, Filled), result


@pytest.fixture
def huge_pool() -> Iterator[int]:
    """4 free 2 MiB pages for the test (vm.nr_hugepages raised by the shortfall
    and restored afterwards)."""
    with harness_hugepages(4) as ok:
        if not ok:
            pytest.skip("needs 4 free 2 MiB pages: raise vm.nr_hugepages")
        yield 4


@pytest.mark.hugetlb
def test_hugetlb_cache_shares_2mib_pages_and_zero_copy_after_remove(huge_pool: int) -> None:
    h = HUGE_PAGE_SIZE
    snap = _pattern(h, 5)
    with Memfd.create("pagein-share-huge", 2 * h, hugetlb=True) as cache, cache.map() as server:
        c = _Clone(cache, Feature.MINOR_HUGETLBFS | Feature.MISSING_HUGETLBFS)
        try:
            server.write(0, snap)
            ev, got = c.access(lambda: c.map.read(0, h),
                               lambda f: _check_filled(c.uffd.continue_(f.address, h)))
            assert ev.minor and got == snap
            with Pagemap() as pm:
                assert _pfn(pm, c.map.address)[2] == _pfn(pm, server.address)[2] != 0

            def fill(f: PageFault) -> None:
                server.write(h, snap)
                _check_filled(c.uffd.continue_(f.address - f.address % h, h))

            ev, got = c.access(lambda: c.map.read(h + 100, 8), fill)
            assert not ev.minor and got == snap[100:108]
            c.remove(0, h)
            with Mapping.anonymous(h) as zeros:  # any readable memory is a source
                ev, got = c.access(
                    lambda: c.map.read(0, h),
                    lambda f: _check_filled(c.uffd.copy(f.address, zeros.address, h)))
            assert ev.minor and got == bytes(h)
            assert server.read(0, h) == snap, "the zero copy reached the cache"
        finally:
            c.close()
