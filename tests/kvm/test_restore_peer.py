"""``--shared-memory`` with a peer that touches pages before the guest does.

The peer is a real second process that maps the guest memfd. Mapped plainly, its first
read of a page not yet filled allocates a zero page in the memfd that the guest then
reads too; through :func:`pagein.vmm.peer.map_guest_memory` it hands its own uffd to the
VM's handler, which fills the page cache with snapshot bytes whoever touches first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_restore import STATE, TIMEOUT, Taken, ask, take_snapshot
from test_restore_share import _serve

from pagein.errors import HandlerError
from pagein.vmm.layout import HEAP_START
from pagein.vmm.peer import map_guest_memory
from pagein.vmm.restore import RestoreOptions, restore


@pytest.fixture(scope="module")
def snap() -> Iterator[Taken]:
    with tempfile.TemporaryDirectory(prefix="pagein-test-peer-") as d:
        yield take_snapshot(d, 1)


# The peer: map the guest memory through the VM's handler, hash the guest's state, exit.
_PEER = textwrap.dedent("""
    import hashlib, sys
    from pagein.vmm.peer import map_guest_memory
    fd, sock, offset, length = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with map_guest_memory(fd, sock) as peer:
        print(hashlib.sha256(peer.mapping.read(offset, length)).hexdigest(), flush=True)
""")


def _state(snap: Taken) -> tuple[int, bytes]:
    length = STATE + snap.ref.capacity * 4  # records and table: never written after READY
    with open(os.path.join(snap.directory, "memory"), "rb") as f:
        f.seek(HEAP_START)
        want = f.read(length)
    assert any(want[:4096])
    return length, want


@pytest.mark.parametrize("handler", ["spawned", "serve"])
def test_a_peer_reading_first_reads_the_snapshot_and_so_does_the_guest(
        snap: Taken, tmp_path: Path, handler: str) -> None:
    length, want = _state(snap)
    opts = RestoreOptions(shared_memory=True)
    with contextlib.ExitStack() as stack:
        if handler == "serve":
            sock = str(tmp_path / "serve.sock")
            stack.enter_context(_serve(os.path.join(snap.directory, "memory"), sock))
            opts = RestoreOptions(shared_memory=True, uffd_socket=sock)
        with restore(snap.directory, opts) as vm:
            assert vm.memfd is not None and vm.handler_socket is not None
            # The guest waits for a request: it has read none of its state yet. The peer
            # reads all of it first, then leaves (the handler must go on serving the VM).
            fd = vm.memfd.fileno()
            out = subprocess.run([sys.executable, "-c", _PEER, str(fd), vm.handler_socket,
                                  str(HEAP_START), str(length)], pass_fds=(fd,),
                                 capture_output=True, text=True, timeout=TIMEOUT, check=True)
            assert out.stdout.strip() == hashlib.sha256(want).hexdigest(), out.stderr
            # The guest reads the pages the peer brought in: snapshot bytes, not zeros.
            assert ask(vm.machine, ("checksum",)) == (snap.ref.answer("checksum"),)
            assert ask(vm.machine, snap.requests[:1]) == snap.answers[:1]


def test_a_peer_of_a_larger_memfd_is_refused_by_the_handler(snap: Taken) -> None:
    with restore(snap.directory, RestoreOptions(shared_memory=True)) as vm:
        assert vm.memfd is not None and vm.handler_socket is not None
        big = os.memfd_create("not-the-guest")
        try:
            os.ftruncate(big, vm.memfd.size * 2)
            with pytest.raises(HandlerError, match="refused this peer's mapping"):
                map_guest_memory(big, vm.handler_socket)
        finally:
            os.close(big)
        assert ask(vm.machine, ("checksum",)) == (snap.ref.answer("checksum"),)
