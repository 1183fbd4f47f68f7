"""Experiment 4: a uffd restore fills the shared mapping, so the peer sees every byte."""

from __future__ import annotations

import pytest

from pagein.lab import fill
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 8 * MIB
PAGES = SIZE // 4096


@pytest.fixture(scope="module")
def result() -> fill.UffdFill:
    return fill.run(SIZE)


@pytest.mark.parametrize("which", ["missing_copy", "minor_continue"])
def test_the_peer_sees_every_restored_byte(result: fill.UffdFill, which: str) -> None:
    run: fill.FillRun = getattr(result, which)
    assert run.guest_pages_equal_snapshot == PAGES
    assert run.peer_pages_equal_snapshot == PAGES
    assert run.same_pfns == PAGES


@pytest.mark.parametrize("which", ["missing_copy", "minor_continue"])
def test_views_stay_one_after_the_restore(result: fill.UffdFill, which: str) -> None:
    run: fill.FillRun = getattr(result, which)
    assert run.guest_write_seen_by_peer
    assert run.peer_write_seen_by_guest


def test_missing_mode_copies_every_page(result: fill.UffdFill) -> None:
    h = result.missing_copy.handler
    assert h.faults == PAGES
    assert h.copies == PAGES
    assert h.continues == 0


def test_minor_mode_copies_nothing(result: fill.UffdFill) -> None:
    h = result.minor_continue.handler
    assert h.faults == PAGES
    assert h.continues == PAGES
    assert h.copies == 0
