"""The lab's helper processes: a failing fault handler must not leave the toucher asleep."""

from __future__ import annotations

from collections import Counter

import pytest

from pagein.errors import PageinError
from pagein.lab._probe import PAGE_SIZE, read_each_page
from pagein.lab._procs import FaultHandler, Peer
from pagein.sys.mapping import Mapping, Memfd
from pagein.sys.uffd import FillResult, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel


class BrokenPolicy:
    """A handler bug: every fill raises."""

    def fill(self, uffd: Userfaultfd, page: int, counts: Counter[str]) -> FillResult:
        raise PageinError(f"no snapshot page for 0x{page:x}")

    def removed(self, start: int, end: int) -> None:
        pass


def test_a_failing_handler_wakes_the_toucher_and_reports() -> None:
    size = 4 * PAGE_SIZE
    with Mapping.anonymous(size) as m, Userfaultfd.open() as uffd:
        uffd.register(m.address, size, RegisterMode.MISSING)
        with FaultHandler(uffd, BrokenPolicy(), (m.address, size)) as handler:
            # Would sleep forever if the handler died with the range still registered.
            assert read_each_page(m.address, size) == bytes(4)
            with pytest.raises(PageinError, match="no snapshot page for"):
                handler.stop()


def test_peer_shares_the_memfd_and_reports_a_bad_request() -> None:
    with Memfd.create("pagein-test-peer", 2 * PAGE_SIZE) as mfd, mfd.map() as m, \
            Peer(mfd.fileno(), 2 * PAGE_SIZE) as peer:
        m.write(PAGE_SIZE, b"hello")
        assert peer.read(PAGE_SIZE, 5) == b"hello"
        with pytest.raises(PageinError, match="outside the mapping"):
            peer.read(2 * PAGE_SIZE, 1)
