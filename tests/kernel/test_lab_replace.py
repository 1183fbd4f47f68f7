"""Experiment 3: a MAP_FIXED|MAP_PRIVATE restore leaves the peer and the kernel on old pages."""

from __future__ import annotations

import pytest

from pagein.lab import replace
from pagein.lab._probe import MIB

pytestmark = pytest.mark.kernel

SIZE = 8 * MIB
PAGES = SIZE // 4096


@pytest.fixture(scope="module")
def result() -> replace.ReplaceMapping:
    return replace.run(SIZE)


def test_before_the_restore_guest_and_peer_share_every_page(
        result: replace.ReplaceMapping) -> None:
    assert result.same_pfns_before == PAGES
    assert result.guest_write_seen_by_peer_before


def test_after_the_replacement_only_the_guest_sees_the_snapshot(
        result: replace.ReplaceMapping) -> None:
    assert result.guest_pages_equal_snapshot == PAGES
    assert result.peer_pages_equal_snapshot == 0
    assert result.same_pfns_after == 0


def test_views_diverge_on_the_next_write(result: replace.ReplaceMapping) -> None:
    assert not result.guest_write_seen_by_peer_after
    assert not result.peer_write_seen_by_guest_after


def test_a_vmspliced_page_stays_the_old_page(result: replace.ReplaceMapping) -> None:
    assert result.pipe_page_is_old_page
    assert not result.pipe_page_equals_guest_view


def test_a_uffd_registration_goes_with_the_replaced_mapping(
        result: replace.ReplaceMapping) -> None:
    assert result.uffd_registered_before
    assert not result.uffd_registered_after
