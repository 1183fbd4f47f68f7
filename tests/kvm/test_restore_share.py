"""``pagein vm restore --share-pages``: clones of a `function` guest through one server.

Each clone's guest memory is a MAP_PRIVATE mapping of the server's page cache of the
snapshot. The tests compare every answer with the original guest's, and count sharing
from this process's pagemap: a clean page of two clones is backed by one physical page.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import ready_serve
from test_restore import STATE, TIMEOUT, Taken, ask, take_snapshot

from pagein._abi.mman import Advice
from pagein.errors import HandlerError
from pagein.sys.mapping import Mapping
from pagein.sys.pagemap import Pagemap
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore

STATE_PAGES = STATE // 4096


@pytest.fixture(scope="module")
def snap() -> Iterator[Taken]:
    with tempfile.TemporaryDirectory(prefix="pagein-test-share-") as d:
        yield take_snapshot(d, 2)


def _serve(mem_file: str, sock: str) -> contextlib.AbstractContextManager[object]:
    return ready_serve([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                        "--mem-file", mem_file, "--workers", "2"], TIMEOUT)


@pytest.fixture
def server(snap: Taken, tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "serve.sock")
    with _serve(os.path.join(snap.directory, "memory"), sock):
        yield sock


def _pfns(vm: RestoredVm) -> list[int]:
    with Pagemap() as pm:
        return [p.pfn if p.present else 0 for m in vm.mappings
                for p in pm.pages(m.address, m.length)]


def _zero_pfn() -> int:
    """The kernel's zero page (a read of untouched anonymous memory maps it)."""
    with Mapping.anonymous(4096) as m, Pagemap() as pm:
        m.read(0, 1)
        return pm.pages(m.address, 4096)[0].pfn


def _same_pages(a: RestoredVm, b: RestoredVm) -> int:
    """Pages of the two guests backed by one physical page (the zero page left out)."""
    zero = _zero_pfn()
    return sum(1 for x, y in zip(_pfns(a), _pfns(b), strict=True) if x == y and x not in
               (0, zero))


def test_clones_answer_exactly_and_share_their_clean_pages(snap: Taken, server: str) -> None:
    share = RestoreOptions(uffd_socket=server, share_pages=True)
    clones = [restore(snap.directory, share) for _ in range(2)]
    private = restore(snap.directory, RestoreOptions(uffd_socket=server))
    try:
        for vm in [*clones, private]:
            assert ask(vm.machine, snap.requests) == snap.answers  # checksum reads it all
        # The state the checksum read is the cache's in both clones, page for page.
        assert _same_pages(*clones) >= STATE_PAGES
        assert _same_pages(clones[0], private) == 0
        for vm in [*clones, private]:
            vm.machine.console.close_input()
            assert vm.wait(TIMEOUT).status == 0
    finally:
        for vm in [*clones, private]:
            vm.close()


def test_share_pages_with_the_handler_spawned_for_the_vm(snap: Taken) -> None:
    # No --uffd-socket: the handler spawned for this VM makes a cache for it alone.
    with restore(snap.directory, RestoreOptions(share_pages=True)) as vm:
        assert ask(vm.machine, snap.requests) == snap.answers
        vm.machine.console.close_input()
        assert vm.wait(TIMEOUT).status == 0


def test_remove_in_one_clone_leaves_the_others_pages(snap: Taken, server: str) -> None:
    share = RestoreOptions(uffd_socket=server, share_pages=True)
    a, b = (restore(snap.directory, share) for _ in range(2))
    try:
        assert ask(a.machine, snap.requests) == snap.answers
        assert ask(b.machine, snap.requests) == snap.answers
        a.machine.stop()
        # A balloon in clone a: its pages read zeros from now on (never the cache's).
        region = a.mappings[0]
        region.madvise(Advice.DONTNEED)
        assert a.machine.memory.read(0, 1 << 20) == bytes(1 << 20)
        # Clone b's memory is untouched: it still answers exactly, reading it all again.
        assert ask(b.machine, snap.requests) == snap.answers
        b.machine.console.close_input()
        assert b.wait(TIMEOUT).status == 0
    finally:
        a.close()
        b.close()


def test_a_cache_of_another_snapshot_is_refused_before_any_guest_runs(
        snap: Taken, tmp_path: Path) -> None:
    small = str(tmp_path / "small.mem")
    with open(small, "wb") as f:
        f.truncate(4 << 20)  # a snapshot smaller than this VM's memory
    sock = str(tmp_path / "small.sock")
    with _serve(small, sock), pytest.raises(HandlerError, match="smaller than this VM's memory"):
        restore(snap.directory, RestoreOptions(uffd_socket=sock, share_pages=True))


def test_share_pages_needs_the_uffd_backend(snap: Taken) -> None:
    with pytest.raises(ValueError, match=r"--share-pages .* needs --backend uffd"):
        restore(snap.directory, RestoreOptions(backend=Backend.FILE, share_pages=True))
