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

pytestmark = [pytest.mark.kernel, pytest.mark.hugetlb]
H = HUGE_PAGE_SIZE
NR = "/proc/sys/vm/nr_hugepages"
NEED = 6


@pytest.fixture
def hugepages() -> Iterator[int]:
    """Reserve NEED more 2 MiB pages for the test; give them back afterwards."""
    with open(NR) as f:
        old = int(f.read())
    try:
        with open(NR, "w") as f:
            f.write(str(old + NEED))
        if hugetlb_free_pages() < NEED:
            pytest.skip(f"could not reserve {NEED} 2 MiB pages via vm.nr_hugepages "
                        f"(memory too fragmented?)")
        yield NEED
    finally:
        with open(NR, "w") as f:
            f.write(str(old))


def test_missing_faults_on_hugetlb_are_served_with_2mib_copies(hugepages: int) -> None:
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


def test_hugetlb_copy_must_be_huge_page_aligned(hugepages: int) -> None:
    src = pattern(H)
    with Toucher.spawn(H, kind="hugetlb") as t:
        from pagein._abi import libc

        with pytest.raises(UffdError) as e:
            t.uffd.copy(t.address, libc.buffer_address(src), 4096)
        assert "huge-page aligned" in str(e.value)
        assert t.uffd.copy(t.address, libc.buffer_address(src), H) == Filled(H)
        t.send("read", H - 16, 16)
        assert t.reply() == bytes(src[H - 16:])


def test_minor_continue_over_a_hugetlb_memfd(hugepages: int) -> None:
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


def test_hugetlb_mapping_reports_missing_pages_clearly(hugepages: int) -> None:
    # Reserving more pages than the pool holds fails at mmap (no MAP_NORESERVE).
    with pytest.raises(Exception) as e:
        Mapping.anonymous((hugepages + 64) * H, hugetlb=True, noreserve=False).close()
    assert "vm.nr_hugepages" in str(e.value)
