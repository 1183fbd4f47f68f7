"""Experiment 6: MADV_DONTNEED on registered memory raises REMOVE; removed pages read zeros."""

from __future__ import annotations

import pytest

from pagein.lab import balloon
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 4 * MIB
PAGES = SIZE // 4096
HALF = PAGES // 2


@pytest.fixture(scope="module")
def result() -> balloon.Balloon:
    return balloon.run(SIZE)


def test_madvise_raises_remove_and_waits_for_the_handler(result: balloon.Balloon) -> None:
    assert result.event_read == "Remove"
    assert result.madvise_waits_for_handler


def test_fills_fail_with_eagain_until_the_remove_is_read(result: balloon.Balloon) -> None:
    assert result.fill_while_remove_unread == "Retry"
    assert result.fill_after_reading == "Filled"


def test_a_correct_handler_fills_removed_pages_with_zeros(result: balloon.Balloon) -> None:
    assert result.correct.removes == 1
    assert result.correct.zero_fills == HALF
    assert result.correct.faults == PAGES + HALF
    assert result.correct_zero_pages == HALF


def test_a_naive_handler_resurrects_stale_snapshot_pages(result: balloon.Balloon) -> None:
    assert result.naive.removes == 1
    assert result.naive.zero_fills == 0
    assert result.naive_stale_pages == HALF
