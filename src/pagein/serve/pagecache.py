"""A snapshot's page cache on the host, shared by every clone restored from it.

With ``--share-pages`` a VMM's guest memory is a MAP_PRIVATE mapping of one memfd that
``pagein serve`` keeps per snapshot (and per page size): the snapshot's page cache.
The VMM registers that mapping MISSING|MINOR; the server fills a cache page once, from
whatever source it serves, and answers every clone's fault with ``UFFDIO_CONTINUE``,
which maps the cache page itself, read-only. A clone's write copies on write into its
own memory; its clean pages stay shared. The kernel facts behind it are pinned by
``tests/kernel/test_share_facts.py``.

The cache is two memfds, made by the supervisor and handed to the workers::

    data     the memory file's bytes at their file offsets (size rounded up to the page
             size; 2 MiB hugetlbfs pages for 2 MiB regions)
    present  one bit per cache page, set once its bytes are in ``data``

Several workers may fill one page at once: each copies the same snapshot bytes into
it, so a page a clone maps never changes, and a set bit lost to two writers of one
byte only costs one more (identical) copy later.

The handover is a pagein extension of the handshake, on a connection of its own before
the Firecracker-style one (a Firecracker VMM never sends it)::

    VMM -> server   {"pagein": "page-cache", "page_size": 4096}\\n
    server -> VMM   {"pagein": "page-cache", "size": N, "page_size": 4096}\\n + memfd
                    or {"pagein": "page-cache", "error": "..."}\\n (no fd); then EOF

When the region message comes, the server reads ``/proc/PID/smaps`` of the VMM
(:func:`mapped_cache`): a VM whose regions all map the cache, privately, at their file
offsets, registered MISSING and MINOR, is served through the cache; one whose regions
map none of it is served as before; anything in between is a bad handshake.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pagein._abi import libc
from pagein.errors import HandlerError, HandshakeError, PageinError
from pagein.serve.bitmap import Bitmap, nbytes
from pagein.serve.firecracker import PAGE_SIZES, Region, check_trusted
from pagein.snapshot.source import PageSource
from pagein.sys.fdpass import recv_with_fds, send_with_fds
from pagein.sys.mapping import Mapping, Memfd
from pagein.sys.poll import wait_readable

__all__ = ["CacheFiller", "CachedMemory", "PageCache", "PageCaches", "is_cache_request",
           "mapped_cache", "read_cache_request", "reply_cache", "request_page_cache"]

log = logging.getLogger("pagein.serve")

_TAG = "page-cache"
_MAX_LINE = 4096  # a request or reply longer than this is refused
_MAX_SMAPS = 64 * 1024 * 1024  # bytes of /proc/PID/smaps read at most


def _name(page_size: int) -> str:
    return f"pagein-cache-{page_size}"


# --- the supervisor's cache ------------------------------------------------------------


class PageCache:
    """One page cache (data and present memfds); the supervisor's, handed to workers.

    The supervisor maps ``data`` shared once: on hugetlbfs that reserves every huge page
    up front, so a short pool fails here, with a message naming ``vm.nr_hugepages``,
    instead of a SIGBUS in a worker filling a page later.
    """

    def __init__(self, source_size: int, page_size: int) -> None:
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page size {page_size} is not one of {PAGE_SIZES}")
        self.page_size = page_size
        self.pages = -(-source_size // page_size)
        self.size_bytes = self.pages * page_size
        self.data = Memfd.create(_name(page_size), self.size_bytes,
                                 hugetlb=page_size != PAGE_SIZES[0])
        try:
            self._reserve = self.data.map()
            self.present_fd = Memfd.create("pagein-cache-present",
                                           -(-nbytes(self.pages) // 4096) * 4096)
            self._present_map = self.present_fd.map()
        except BaseException:
            self.data.close()
            raise
        self._view = self._present_map.view()
        self.present = Bitmap(self.pages, self._view)
        self.inode = os.fstat(self.data.fileno()).st_ino
        self.users = 0  # VMs served through it now
        self.used_at = time.monotonic()  # last time a VM used it or a VMM asked for it

    def fds(self) -> list[int]:
        """The fds a worker needs (:meth:`CacheFiller.attach` takes them)."""
        return [self.data.fileno(), self.present_fd.fileno()]

    def stats(self) -> dict[str, object]:
        n = self.present.count
        return {"page_size": self.page_size, "size_bytes": self.size_bytes,
                "pages": self.pages, "pages_present": n,
                "bytes_present": n * self.page_size, "vms": self.users}

    def close(self) -> None:
        """Drop the cache (idempotent). VMs that map it keep their pages: a memfd lives
        as long as any mapping of it, so this never affects a running guest."""
        if self.present is None:
            return
        self._view.release()
        self._present_map.close()
        self.present_fd.close()
        self._reserve.close()
        self.data.close()
        self.present = None  # type: ignore[assignment]


class PageCaches:
    """The supervisor's page caches of one snapshot, one per page size: made when a VMM
    first asks, counted while VMs use them, dropped ``keep_s`` seconds after the last
    one went (a timer thread; a VM that maps a dropped cache keeps its pages)."""

    def __init__(self, source_size: int, describe: str, keep_s: float) -> None:
        self._source_size = source_size
        self._describe = describe
        self._keep_s = keep_s
        self._lock = threading.Lock()
        self._by_size: dict[int, PageCache] = {}

    def get(self, page_size: int) -> PageCache:
        """The cache of ``page_size`` pages, made now if there is none."""
        with self._lock:
            cache = self._by_size.get(page_size)
            if cache is None:
                cache = PageCache(self._source_size, page_size)
                self._by_size[page_size] = cache
                log.info("page cache of %s made: %d bytes in %d-byte pages",
                         self._describe, cache.size_bytes, page_size)
            cache.used_at = time.monotonic()
            return cache

    def all(self) -> list[PageCache]:
        with self._lock:
            return list(self._by_size.values())

    def acquire(self, cache: PageCache) -> None:
        """A VM is served through ``cache`` from now on."""
        with self._lock:
            cache.users += 1
            cache.used_at = time.monotonic()

    def release(self, cache: PageCache) -> None:
        """A VM served through ``cache`` has ended: drop it if nobody uses it for a while."""
        with self._lock:
            cache.users -= 1
            cache.used_at = time.monotonic()
        t = threading.Timer(self._keep_s + 0.01, self._drop_idle)
        t.daemon = True
        t.start()

    def _drop_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [ps for ps, c in self._by_size.items()
                    if c.users == 0 and now - c.used_at >= self._keep_s]
            dropped = [self._by_size.pop(ps) for ps in idle]
        for c in dropped:
            log.info("page cache of %d-byte pages dropped (%d bytes held; no VM used it for "
                     "%g s)", c.page_size, c.present.count * c.page_size, self._keep_s)
            c.close()

    def stats(self) -> list[dict[str, object]]:
        """Each page cache: its size, the pages it holds, the VMs using it."""
        return [c.stats() for c in self.all()]

    def close(self) -> None:
        with self._lock:
            caches, self._by_size = list(self._by_size.values()), {}
        for c in caches:
            c.close()


# --- a worker's view ---------------------------------------------------------------------


class CacheFiller:
    """A worker's mapping of a :class:`PageCache`: fill pages from the source once."""

    def __init__(self, data: Mapping, present_map: Mapping, pages: int, page_size: int,
                 fds: tuple[Memfd, Memfd]) -> None:
        self.page_size = page_size
        self._data = data
        self._present_map = present_map
        self._view = present_map.view()
        self.present = Bitmap(pages, self._view)
        self._fds = fds

    @classmethod
    def attach(cls, data_fd: int, present_fd: int, size_bytes: int,
               page_size: int) -> CacheFiller:
        """Map the cache memfds (now owned by the result). Raises PageinError when they are
        not the cache the supervisor described."""
        hugetlb = page_size != PAGE_SIZES[0]
        data = Memfd(data_fd, size_bytes, hugetlb=hugetlb)
        present = Memfd(present_fd, os.fstat(present_fd).st_size, hugetlb=False)
        try:
            pages = size_bytes // page_size
            if (page_size not in PAGE_SIZES or size_bytes <= 0 or size_bytes % page_size
                    or os.fstat(data_fd).st_size != size_bytes
                    or present.size < nbytes(pages)):
                raise PageinError(f"page cache memfds (fd {data_fd}, {present_fd}) are not a "
                                  f"cache of {size_bytes} bytes in {page_size}-byte pages")
            dmap = data.map()
            try:
                pmap = present.map()
            except BaseException:
                dmap.close()
                raise
        except BaseException:
            data.close()
            present.close()
            raise
        return cls(dmap, pmap, pages, page_size, (data, present))

    def core_args(self) -> tuple[int, int, int, memoryview | bytearray, int]:
        """The ``cache`` argument of the native core: (data memfd, its address here,
        size in bytes, present bitmap, page size). Valid while this filler is open."""
        return (self._fds[0].fileno(), self._data.address, self._fds[0].size,
                self.present.buffer, self.page_size)

    def ensure(self, source: PageSource, offset: int, length: int) -> int:
        """Copy the pages of ``[offset, offset+length)`` not yet in the cache from
        ``source``; return the bytes copied. The range is page-aligned.

        Safety: writes the cache through this process's shared mapping; every clone maps
        these pages, so only snapshot bytes may ever be written here.
        """
        ps = self.page_size
        first, count = offset // ps, -(-length // ps)
        if self.present.count_range(first, count) == count:
            return 0  # warm: the common case once a clone has run (no search to the end)
        copied = 0
        for p, n in self.present.clear_runs(first, first + count):
            off = p * ps
            ln = min(n * ps, source.size - off)  # the last page may run past the file
            if ln > 0:
                self._copy(source, off, ln)
                copied += ln
            self.present.set(p, n)
        return copied

    def _copy(self, source: PageSource, off: int, ln: int) -> None:
        """Put ``ln`` source bytes at ``off`` in the cache. ``pwrite`` into the memfd
        when the source has an address: the kernel allocates the cache page and copies
        in one call, where a store through a mapping would take a page fault per page
        first (tens of µs each on a nested VM). Hugetlbfs has no write(), and a source
        without an address reads straight into the mapping."""
        src = source.address_of(off, ln)
        if src is not None and self.page_size == PAGE_SIZES[0]:
            data = libc.memory_view(src, ln)
            done = 0
            while done < ln:
                done += os.pwrite(self._fds[0].fileno(), data[done:], off + done)
            return
        if src is not None:
            libc.memmove(self._data.address + off, src, ln)
            return
        view = self._data.view()
        try:
            source.read_into(off, view[off:off + ln])
        finally:
            view.release()

    def close(self) -> None:
        self._view.release()
        self._present_map.close()
        self._data.close()
        for fd in self._fds:
            fd.close()


# --- the handover (server side) ----------------------------------------------------------


def is_cache_request(conn: socket.socket, timeout: float) -> bool:
    """Whether the first bytes on a new connection are a page-cache request (peeked:
    a Firecracker handshake, which starts with ``[``, is left unread)."""
    if not wait_readable([conn], timeout):
        return False
    try:
        head = conn.recv(64, socket.MSG_PEEK)
    except OSError:
        return False
    return head.lstrip(b" \t\r\n")[:1] == b"{"


def read_cache_request(conn: socket.socket, timeout: float) -> int:
    """Read a page-cache request line; return the page size it asks for.

    Raises :class:`HandshakeError` naming what is wrong.
    """
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable([conn], left):
            raise HandshakeError("page-cache request", f"{len(buf)} bytes",
                                 f"no complete line within {timeout:g} s")
        chunk = conn.recv(_MAX_LINE)
        if not chunk:
            raise HandshakeError("page-cache request", buf[:40].decode(errors="replace"),
                                 "the peer closed the socket before the line ended")
        buf += chunk
        if len(buf) > _MAX_LINE:
            raise HandshakeError("page-cache request", f"{len(buf)} bytes",
                                 f"longer than {_MAX_LINE} bytes")
    line = buf.partition(b"\n")[0]
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("pagein") != _TAG:
        raise HandshakeError("page-cache request", line[:80].decode(errors="replace"),
                             'expected {"pagein": "page-cache", "page_size": 4096}')
    ps = doc.get("page_size", PAGE_SIZES[0])
    if type(ps) is not int or ps not in PAGE_SIZES:
        raise HandshakeError("page-cache request.page_size", ps,
                             f"must be one of {', '.join(str(p) for p in PAGE_SIZES)}")
    return ps


def reply_cache(conn: socket.socket, cache: PageCache | None, error: str = "") -> None:
    """Send the cache's data memfd (or ``error``) and nothing more."""
    if cache is None:
        conn.sendall(json.dumps({"pagein": _TAG, "error": error[:1000]}).encode() + b"\n")
        return
    line = json.dumps({"pagein": _TAG, "size": cache.size_bytes,
                       "page_size": cache.page_size}).encode() + b"\n"
    sent = send_with_fds(conn, line, [cache.data.fileno()])
    if sent < len(line):
        conn.sendall(line[sent:])


# --- the handover (VMM side) -------------------------------------------------------------


@dataclass(slots=True)
class CachedMemory:
    """The page cache a VMM received: map its regions from ``memfd`` (MAP_PRIVATE)."""

    memfd: Memfd
    size_bytes: int
    page_size: int


def request_page_cache(socket_path: str, page_size: int, *, need_bytes: int,
                       timeout: float = 10.0, trust_uids: Sequence[int] = ()) -> CachedMemory:
    """Ask the ``pagein serve`` on ``socket_path`` for its page cache of ``page_size``.

    ``need_bytes`` is where the VMM's last region ends in the memory file: a cache
    smaller than that, of another page size, or not a memfd, is refused here, before
    any guest memory is mapped. Raises :class:`~pagein.errors.HandlerError` (or
    :class:`~pagein.errors.UntrustedHandler` for a listener of an untrusted uid).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
            raise HandlerError(f"no UFFD handler listens on {socket_path} "
                               f"({e.strerror or 'timed out'}): start `pagein serve "
                               f"--socket {socket_path}` first") from e
        check_trusted(sock, socket_path, trust_uids)
        sock.sendall(json.dumps({"pagein": _TAG, "page_size": page_size}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf and len(buf) <= _MAX_LINE:
            got = recv_with_fds(sock, _MAX_LINE, 2)
            fds += got.fds
            if not got.data:
                break
            buf += got.data
        return _accept_reply(socket_path, buf.partition(b"\n")[0], fds, page_size,
                             need_bytes)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()


def _accept_reply(socket_path: str, line: bytes, fds: list[int], page_size: int,
                  need_bytes: int) -> CachedMemory:
    where = f"the handler on {socket_path}"
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("pagein") != _TAG:
        raise HandlerError(f"{where} does not offer a page cache (it answered "
                           f"{line[:80]!r}): it needs pagein serve with --share-pages support")
    if "error" in doc:
        raise HandlerError(f"{where} refused its page cache: {str(doc['error'])[:300]}")
    size, ps = doc.get("size"), doc.get("page_size")
    if len(fds) != 1 or type(size) is not int or ps != page_size:
        raise HandlerError(f"{where} sent a bad page-cache reply ({len(fds)} fds, size "
                           f"{size!r}, page size {ps!r}; asked for {page_size})")
    fd = fds.pop()
    target = os.readlink(f"/proc/self/fd/{fd}")
    actual = os.fstat(fd).st_size
    if not target.startswith(f"/memfd:{_name(page_size)}") or actual != size:
        os.close(fd)
        raise HandlerError(f"{where} sent {target} of {actual} bytes as its page cache, "
                           f"not a pagein cache memfd of {size} bytes")
    if size < need_bytes:
        os.close(fd)
        raise HandlerError(f"{where} serves a snapshot of {size} bytes, smaller than this "
                           f"VM's memory ({need_bytes} bytes): is it serving another snapshot?")
    return CachedMemory(Memfd(fd, size, hugetlb=page_size != PAGE_SIZES[0]), size, page_size)


# --- the check at the region message -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Vma:
    start: int
    end: int
    private: bool
    offset: int
    inode: int
    path: str
    flags: frozenset[str]


def _vmas(pid: int) -> list[_Vma]:
    """Parse ``/proc/PID/smaps`` (bounded): each mapping with its VmFlags."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        text = f.read(_MAX_SMAPS)
    out: list[_Vma] = []
    head: list[str] | None = None
    for raw in text.splitlines():
        line = raw.decode(errors="replace")
        if line.startswith("VmFlags:") and head is not None:
            a, _, b = head[0].partition("-")
            out.append(_Vma(int(a, 16), int(b, 16), head[1][3:4] == "p", int(head[2], 16),
                            int(head[4]), head[5] if len(head) > 5 else "",
                            frozenset(line.split()[1:])))
            head = None
        else:
            parts = line.split(None, 5)
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                head = parts
    return out


def mapped_cache(pid: int, regions: Sequence[Region],
                 caches: Sequence[PageCache]) -> PageCache | None:
    """The cache every region of VMM ``pid`` maps, or None when none maps a cache.

    A region mapping a cache dropped since (another inode) maps no cache: it is served
    without sharing, with ``UFFDIO_COPY`` into its private mapping, which is correct.

    Raises :class:`HandshakeError` naming the region when only some regions map it, or
    one maps it shared, at another offset, or without MISSING|MINOR registration.
    """
    if not caches:
        return None  # nothing to share: a Firecracker VMM costs no smaps read
    try:
        vmas = _vmas(pid)
    except OSError:
        return None  # no /proc: nothing is shared
    by_inode = {(c.inode, _name(c.page_size)): c for c in caches}
    found: PageCache | None = None
    plain: int | None = None
    for i, r in enumerate(regions):
        where = f"regions[{i}].base_host_virt_addr"
        over = [v for v in vmas if v.start < r.end_address and v.end > r.base_address]
        hits = [by_inode.get((v.inode, v.path.removeprefix("/memfd:").split(" ")[0]))
                for v in over]
        if not any(hits):
            plain = i
            continue
        c = hits[0]
        if c is None or any(h is not c for h in hits) or over[0].start > r.base_address \
                or over[-1].end < r.end_address:
            raise HandshakeError(where, hex(r.base_address),
                                 "the region maps the page cache only in part")
        for v in over:
            at = v.offset + (max(v.start, r.base_address) - v.start)
            if at != r.offset + max(v.start, r.base_address) - r.base_address:
                raise HandshakeError(where, hex(r.base_address),
                                     f"the region maps the page cache at offset 0x{at:x}, "
                                     f"not at its file offset 0x{r.offset:x}")
            if not v.private:
                raise HandshakeError(where, hex(r.base_address),
                                     "the page cache must be mapped MAP_PRIVATE (a shared "
                                     "mapping would let the guest write the snapshot)")
            if not {"um", "ui"} <= v.flags:
                raise HandshakeError(where, hex(r.base_address),
                                     "a region mapping the page cache must be registered "
                                     "MISSING|MINOR (UFFD_FEATURE_MINOR_SHMEM or "
                                     "_HUGETLBFS), or a ballooned page would read stale data")
        if found is not None and c is not found:
            raise HandshakeError(where, hex(r.base_address),
                                 "regions map two different page caches")
        found = c
    if found is not None and plain is not None:
        raise HandshakeError(f"regions[{plain}].base_host_virt_addr",
                             hex(regions[plain].base_address),
                             "other regions map the page cache and this one does not")
    return found

