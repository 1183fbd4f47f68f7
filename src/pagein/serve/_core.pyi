"""Type stubs of the C fault core (``_core.c``): the per-fault data plane, GIL released.

Mirrors :mod:`pagein.serve.session`; see ``_core.c`` for the ordering rules it keeps.
"""

from collections.abc import Sequence

from typing_extensions import Buffer

REASON_STOP: int  # stop_fd became readable
REASON_SOCKET: int  # sock_fd readable or hung up
REASON_EVENTS: int  # non-fault uffd events were read (and counted); see `events`
REASON_IDLE: int  # the poll timeout expired (timeout_ms >= 0)
REASON_UNSERVED: int  # faults outside every extent; see `unserved`
REASON_RECORDS: int  # the record buffers hold >= 65536 entries: call take_records()
REASON_PEER_GONE: int  # an ioctl said ESRCH: the VMM's address space is gone
REASON_POLLERR: int  # poll() reported POLLERR on the uffd (UFFDIO_API never completed)

CAUSE_DEMAND: int
CAUSE_READAHEAD: int
CAUSE_PREFETCH: int
CAUSE_BACKGROUND: int
CAUSE_ZERO: int

N_COUNTERS: int
C_FAULTS: int
C_PAGES: int
C_BYTES_FAULT: int
C_BYTES_READAHEAD: int
C_BYTES_BACKGROUND: int
C_ZERO_PAGES: int
C_RETRIES: int
C_EEXIST: int
C_REMOVES: int
C_REMOVED_BYTES: int
C_UNMAPS: int
C_REMAPS: int
C_COLLAPSED: int
C_COLLAPSE_FAILED: int
C_LATENCY_US_SUM: int
C_LATENCY_BUCKETS: int  # the first of 14 buckets
RECORD_SIZE: int  # bytes per fault or fill record (24)

class Core:
    """One VM's fault-serving core. One thread uses it at a time.

    ``pagemap_fd`` (the VMM's ``/proc/PID/pagemap``, or -1) is read to check every
    EEXIST on a 2 MiB page: an empty hugetlb pool says EEXIST too, and a page not
    present then fails the call with ENOMEM and the pool hint. ``tripwire``: when its
    first byte is non-zero no fill ioctl is issued (ESTALE: the memory file changed).
    Both stay the caller's and must outlive the core.

    ``cache`` (``--share-pages``): ``(data memfd, its address in this process, its size
    in bytes, the present bitmap, page size)``. Data pages are written into the memfd
    once (pwrite; memcpy through the address on hugetlbfs), marked present, and mapped
    with ``UFFDIO_CONTINUE``; zeros stay private zero pages. Every region must use the
    cache's page size and lie inside it.

    Safety: every address handed in (``base_address``, overlay addresses,
    ``zero_address``) is read by the kernel as the source of fills into the VMM's
    memory; they must stay mapped and readable until :meth:`close`. The cache address
    is written (huge pages) and must stay mapped shared and writable as long.
    """

    def __init__(self, uffd_fd: int, regions: Sequence[tuple[int, int, int]],
                 filled: Sequence[Buffer], discarded: Sequence[Buffer],
                 holes: Sequence[Buffer | None], counters: Buffer, base_address: int,
                 overlay: Sequence[tuple[int, int, int]], zero_address: int,
                 readahead_pages: Sequence[int], chunk_bytes: int, record: bool,
                 journal: Buffer | None = None, pagemap_fd: int = -1,
                 tripwire: Buffer | None = None,
                 cache: tuple[int, int, int, Buffer, int] | None = None) -> None: ...
    def set_extents(self, extents: Sequence[tuple[int, int, int, int]]) -> None:
        """Replace the live ranges: ``(address, length, region, rel)``, sorted, disjoint."""
    def run(self, stop_fd: int, sock_fd: int, timeout_ms: int
            ) -> tuple[int, list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
        """Serve until a reason to return: ``(reason, events, unserved)``."""
    def fill(self, region: int, first_page: int, pages: int, cause: int,
             dontwake: bool) -> bool:
        """Fill the unfilled live pages of a range; False when a fill hit EAGAIN."""
    def wake_installed(self) -> None:
        """Wake each contiguous piece installed with ``dontwake`` since the last call."""
    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE ``[start, start+length)``."""
    def applied(self) -> None:
        """The events run()/drain() returned are applied: clear the journal."""
    def drain(self, timeout_ms: int) -> list[tuple[int, int, int, int]]:
        """Wait up to ``timeout_ms`` for messages; defer the faults, return the events."""
    def take_records(self) -> tuple[bytes, bytes]:
        """Return and clear ``(fault records, fill records)``, 24-byte native structs."""
    @property
    def deferred(self) -> int:
        """Faults waiting for a retry."""
    def close(self) -> None:
        """Release the buffers (idempotent); the uffd stays open."""
    def set_crash(self, point: int, n: int) -> None:
        """SIGKILL this process the ``n``-th time ``point`` is reached (1: a fill ioctl
        returned, its pages not yet marked; 2: read() returned a non-fault event, not yet
        applied). For the recovery tests: see :mod:`pagein.serve.crash`."""
