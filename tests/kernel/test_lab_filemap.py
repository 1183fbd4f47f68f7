"""Experiment 2: MAP_SHARED and MAP_PRIVATE of one file, on the real page cache."""

from __future__ import annotations

import pytest

from pagein.lab import filemap
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 16 * MIB
PAGES = SIZE // 4096
HALF = PAGES // 2


@pytest.fixture(scope="module")
def result() -> filemap.FileMappings:
    return filemap.run(SIZE)


def test_both_mappings_read_the_same_page_cache_pages(result: filemap.FileMappings) -> None:
    assert result.same_pfns_after_reads == PAGES


def test_reads_fault_around(result: filemap.FileMappings) -> None:
    assert result.warm_read_faults < PAGES // 4
    assert result.pages_per_read_fault > 4


def test_a_private_write_copies_and_leaves_the_file_unchanged(
        result: filemap.FileMappings) -> None:
    assert result.private_write_faults >= HALF
    assert result.private_dirty_kib >= HALF * 4
    assert result.same_pfns_after_private_write == PAGES - HALF
    assert result.file_unchanged_after_private_write


def test_a_shared_write_reaches_the_file(result: filemap.FileMappings) -> None:
    assert result.file_changed_by_shared_write


def test_unwritten_private_pages_still_follow_the_file(result: filemap.FileMappings) -> None:
    assert result.private_written_pages_kept == HALF
    assert result.private_unwritten_pages_follow_file == PAGES - HALF
