"""2 MiB hugetlb pages: MISSING + UFFDIO_COPY of whole huge pages, and MINOR + CONTINUE
over a hugetlb memfd. The test reserves pages in ``vm.nr_hugepages`` and restores the
old value afterwards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from _toucher import Toucher, copy_from, pattern, serve

from pagein.errors import UffdError
from pagein.sys.mapping import HUGE_PAGE_SIZE, Mapping, Memfd, hugetlb_free_pages
from pagein.sys.uffd import Event, Feature, Filled, PageFault, RegisterMode, Userfaultfd
from serve_harness import hugepages as harness_hugepages

pytestmark = [pytest.mark.kernel, pytest.mark.hugetlb]
H = HUGE_PAGE_SIZE
NEED = 6


@pytest.fixture
def huge_pool() -> Iterator[int]:
    """NEED free 2 MiB pages for the test (vm.nr_hugepages raised by the shortfall
    and restored afterwards)."""
    with harness_hugepages(NEED) as ok:
        if not ok:
            pytest.skip(f"needs {NEED} free 2 MiB pages: raise vm.nr_hugepages")
        yield NEED


def test_missing_faults_on_hugetlb_are_served_with_2mib_copies(huge_pool: int) -> None:
    src = pattern(2 * H)
    faults: list[PageFault] = []
    with Toucher.spawn(2 * H, kind="hugetlb", features=Feature.MISSING_HUGETLBFS) as t:
        fill = copy_from(src, t.address, H)

        def handle(u: Userfaultfd, ev: Event) -> None:
            assert isinstance(ev, PageFault)
            faults.append(ev)
            fill(u, ev)

        t.send("digest", 0, 2 * H)
        got = serve(t, handle)
    assert got == hashlib.sha256(src).hexdigest()
    # One fault per huge page, at huge-page-aligned addresses.
    assert sorted(f.address for f in faults) == [t.address, t.address + H]


def test_hugetlb_copy_must_be_huge_page_aligned(huge_pool: int) -> None:
    src = pattern(H)
    with Toucher.spawn(H, kind="hugetlb") as t:
        from pagein._abi import libc

        with pytest.raises(UffdError) as e:
            t.uffd.copy(t.address, libc.buffer_address(src), 4096)
        assert "huge-page aligned" in str(e.value)
        assert t.uffd.copy(t.address, libc.buffer_address(src), H) == Filled(H)
        t.send("read", H - 16, 16)
        assert t.reply() == bytes(src[H - 16:])


def test_minor_continue_over_a_hugetlb_memfd(huge_pool: int) -> None:
    src = pattern(2 * H, seed=2)
    seen: list[PageFault] = []
    with Memfd.create("huge", 2 * H, hugetlb=True) as mfd:
        assert mfd.page_size == H
        with mfd.map() as alias:
            assert alias.page_size == H
            alias.write(0, src)
        with Toucher.spawn(2 * H, kind="memfd", memfd=mfd, features=Feature.MINOR_HUGETLBFS,
                           mode=RegisterMode.MINOR) as t:

            def cont(u: Userfaultfd, ev: Event) -> None:
                assert isinstance(ev, PageFault)
                seen.append(ev)
                assert u.continue_(ev.address, H) == Filled(H)

            t.send("digest", 0, 2 * H)
            got = serve(t, cont)
    assert got == hashlib.sha256(src).hexdigest()
    assert len(seen) == 2 and all(f.minor for f in seen)


def test_hugetlb_mapping_reports_missing_pages_clearly(huge_pool: int) -> None:
    # Reserving more pages than the pool holds fails at mmap (no MAP_NORESERVE).
    with pytest.raises(Exception) as e:
        Mapping.anonymous((hugetlb_free_pages() + 64) * H, hugetlb=True, noreserve=False).close()
    assert "vm.nr_hugepages" in str(e.value)
