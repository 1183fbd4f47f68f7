"""Experiment 5: zero pages and file holes, measured."""

from __future__ import annotations

import pytest

from pagein.lab import zero
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 8 * MIB
PAGES = SIZE // 4096


@pytest.fixture(scope="module")
def result() -> zero.ZeroPages:
    return zero.run(SIZE)


def test_untouched_anonymous_memory_reads_one_physical_page(result: zero.ZeroPages) -> None:
    assert result.anonymous_read_pfns == 1


def test_uffd_zeropage_maps_the_zero_page_and_costs_no_memory(result: zero.ZeroPages) -> None:
    assert result.zeropage_handler.zero_fills == PAGES
    assert result.zeropage_pfns == 1
    assert result.zeropage_rss_growth_kib < 1024


def test_uffd_copy_of_zeros_allocates_a_page_each(result: zero.ZeroPages) -> None:
    assert result.copy_zeros_handler.copies == PAGES
    assert result.copy_zeros_pfns == PAGES
    assert result.copy_zeros_rss_growth_kib >= SIZE // 1024 * 9 // 10


def test_reading_file_holes_allocates_no_blocks(result: zero.ZeroPages) -> None:
    assert result.hole_file_blocks_before == 0
    assert result.hole_file_blocks_after == 0
    assert result.hole_read_pfns == PAGES  # zeroed page-cache pages, one each


def test_seek_data_finds_only_the_written_extents(result: zero.ZeroPages) -> None:
    assert result.sparse_data_bytes == SIZE // 2
    assert result.sparse_data_extents == SIZE // MIB // 2
