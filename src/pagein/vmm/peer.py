"""Map a lazily restored guest's shared memory from another process (a device backend).

A VM restored with ``shared_memory`` keeps guest RAM in one memfd laid out like the
memory file (:attr:`pagein.vmm.restore.RestoredVm.memfd`), and registers its own
mapping MISSING with ``UFFD_FEATURE_MISSING_SHMEM``. A second process that maps the
memfd *without* a userfaultfd and reads a page nobody has filled yet makes the kernel
allocate a zero page in the memfd's page cache: the peer reads zeros, and so does the
guest afterwards (the page is no longer missing, so its handler never hears of it).

:func:`map_guest_memory` closes that hole the way QEMU's postcopy does with vhost-user
backends: the peer registers its own shared mapping MISSING and hands that uffd to the
same handler, as a Firecracker-style handshake of one region covering the memfd at file
offset 0. Whichever process touches a page first, the handler fills the memfd's page
cache with the snapshot's bytes (``UFFDIO_COPY`` into a shared shmem mapping allocates
the page cache page), and both see them; the other never faults on it. Two fills racing
on one page are an EEXIST for the loser, which only wakes.

Balloon pages stay what they are for shared guest memory: a REMOVE event reaches the
handler only through the uffd of the process that called ``madvise``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from pagein.errors import HandlerError
from pagein.serve.firecracker import Region, connect_and_send
from pagein.serve.session import STATS_REQUEST
from pagein.sys.mapping import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, Memfd
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

__all__ = ["PeerMemory", "map_guest_memory"]


class PeerMemory:
    """A peer's mapping of guest memory, served by the VM's handler. Context manager.

    :attr:`mapping` is the whole memfd, shared, at file offsets (the memory file's
    layout). ``close()`` unmaps it first, then drops the uffd and the socket, so no
    access can ever fall back to the zero pages of an unserved range.
    """

    def __init__(self, mapping: Mapping, uffd: Userfaultfd, sock: socket.socket) -> None:
        self.mapping = mapping
        self._uffd = uffd
        self._sock = sock

    def close(self) -> None:
        """Unmap, then release the uffd and the handler connection (idempotent)."""
        self.mapping.close()
        self._uffd.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def map_guest_memory(memfd_fd: int, socket_path: str, *, page_size: int = PAGE_SIZE,
                     trust_uids: Sequence[int] = (), timeout: float = 10.0) -> PeerMemory:
    """Map the guest memfd ``memfd_fd`` (a dup is taken; the caller keeps its fd) and
    have the handler on ``socket_path`` serve this mapping too.

    ``socket_path`` is the VM's handler (:attr:`RestoredVm.handler_socket`); the handler
    must serve the snapshot the VM was restored from, whose memory file the memfd
    mirrors. ``page_size`` is the guest's (2 MiB for a hugetlbfs memfd).

    Raises :class:`~pagein.errors.HandlerError` when the memfd's size is not a multiple
    of ``page_size`` or no trusted handler listens; the handler's own refusal (a memfd
    larger than the snapshot) closes the connection, and the first touch would then
    block: the handshake is therefore confirmed with one stats round trip first.

    Safety: touching :attr:`PeerMemory.mapping` is safe from this process only while the
    handler is another process (it always is: the VM's).
    """
    if page_size not in (PAGE_SIZE, HUGE_PAGE_SIZE):
        raise ValueError(f"page size {page_size} must be {PAGE_SIZE} or {HUGE_PAGE_SIZE}")
    size = os.fstat(memfd_fd).st_size
    if size <= 0 or size % page_size:
        raise HandlerError(f"guest memfd (fd {memfd_fd}) is {size} bytes, not a positive "
                           f"multiple of the page size {page_size}")
    memfd = Memfd(os.dup(memfd_fd), size, hugetlb=page_size == HUGE_PAGE_SIZE)
    mapping: Mapping | None = None
    uffd: Userfaultfd | None = None
    try:
        mapping = memfd.map(shared=True)
        shmem = Feature.MISSING_HUGETLBFS if page_size == HUGE_PAGE_SIZE \
            else Feature.MISSING_SHMEM
        uffd = Userfaultfd.open(Feature.EVENT_REMOVE | shmem)
        uffd.register(mapping.address, size, RegisterMode.MISSING)
        sock = connect_and_send(socket_path, [Region(mapping.address, size, 0, page_size)],
                                uffd, trust_uids=trust_uids, timeout=timeout)
    except BaseException:
        if mapping is not None:
            mapping.close()
        if uffd is not None:
            uffd.close()
        raise
    finally:
        memfd.close()  # the mapping keeps the memory
    peer = PeerMemory(mapping, uffd, sock)
    try:
        _confirm(sock, socket_path, timeout)
    except BaseException:
        peer.close()
        raise
    return peer


def _confirm(sock: socket.socket, socket_path: str, timeout: float) -> None:
    """One stats round trip: a handler that refused the handshake has closed the socket
    (a touch would otherwise block with no word said)."""
    sock.settimeout(timeout)
    refused = HandlerError(f"the UFFD handler on {socket_path} refused this peer's mapping "
                           "(see its log): is it serving this VM's snapshot?")
    try:
        sock.sendall(STATS_REQUEST)
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                raise refused
            buf += chunk
    except (ConnectionResetError, BrokenPipeError):
        raise refused from None
    except TimeoutError as e:
        raise HandlerError(f"the UFFD handler on {socket_path} did not answer within "
                           f"{timeout:g} s") from e
    finally:
        sock.settimeout(None)
