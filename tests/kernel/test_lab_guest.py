"""Experiment 8: a guest's missing pages go through KVM to userfaultfd, not to the VMM."""

from __future__ import annotations

import os

import pytest

from pagein.lab import guest
from pagein.lab._probe import MIB

pytestmark = [pytest.mark.kernel, pytest.mark.kvm]

SIZE = 8 * MIB
HEAP_PAGES = SIZE // 4096


@pytest.fixture(scope="module")
def result() -> guest.GuestView:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is absent or not read/writable on this machine")
    return guest.run(SIZE)


def test_both_restores_run_the_guest_to_the_reference_answer(result: guest.GuestView) -> None:
    for run in (result.eager, result.lazy):
        assert run.status == 0
        assert run.output_matches_reference, run.restore


def test_every_page_the_guest_touches_reaches_the_handler(result: guest.GuestView) -> None:
    assert result.eager.uffd.faults == 0
    assert result.lazy.uffd.faults >= HEAP_PAGES
    assert result.lazy.uffd.copies == result.lazy.uffd.faults
    # Only the pages the guest touched after READY: not the untouched system area.
    assert result.lazy.uffd.faults < result.memory_bytes // 4096


def test_the_faults_cost_the_vmm_no_exit(result: guest.GuestView) -> None:
    assert result.lazy.exits == result.eager.exits
    assert result.lazy.exits_total == result.eager.exits_total
