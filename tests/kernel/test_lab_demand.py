"""Experiment 1: demand paging, measured on the real kernel."""

from __future__ import annotations

import pytest

from pagein.lab import demand
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 16 * MIB
PAGES = SIZE // 4096
NOISE = 64  # faults the interpreter itself may take during a step


@pytest.fixture(scope="module")
def result() -> demand.DemandPaging:
    return demand.run(SIZE)


def test_mmap_commits_nothing(result: demand.DemandPaging) -> None:
    assert result.present_after_mmap == 0
    assert result.rows[0].minor_faults < NOISE


def test_reading_untouched_memory_maps_the_zero_page(result: demand.DemandPaging) -> None:
    assert PAGES <= result.read_faults <= PAGES + NOISE
    assert result.pfns_after_read == 1
    assert result.read_pfn_is_zero_page
    assert result.rss_growth_after_read_kib < 1024


def test_first_write_allocates_one_page_each(result: demand.DemandPaging) -> None:
    assert PAGES <= result.write_faults <= PAGES + NOISE
    assert result.pfns_after_write == PAGES
    assert result.rss_growth_after_write_kib >= SIZE // 1024 * 9 // 10


def test_transparent_huge_pages_map_512_pages_per_fault(result: demand.DemandPaging) -> None:
    if result.thp_setting not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {result.thp_setting!r} on this machine")
    assert result.thp_anon_huge_kib > 0
    assert result.thp_write_faults <= PAGES // 512 + NOISE
