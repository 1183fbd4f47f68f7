"""Memory mappings and memfds: mmap at an address, madvise, mincore.

A :class:`Mapping` owns one ``mmap`` range and exposes its address, so it can be
registered with userfaultfd or handed to KVM as a memory slot. A :class:`Memfd` owns
one memfd (optionally hugetlb) that can be mapped shared by several processes.

Safety: :meth:`Mapping.view` returns a memoryview over raw memory. Using it after
:meth:`Mapping.close` crashes the process; touching a uffd-registered range from a
Python thread of the process that serves it deadlocks on the GIL (docs/serve.md, "Library use").
"""

from __future__ import annotations

import errno
import os
import warnings
from types import TracebackType
from typing import Self

from pagein._abi import libc
from pagein._abi.mman import MAP_FAILED, Advice, MapFlag, MemfdFlag, MremapFlag, Prot
from pagein.errors import MappingError, Unavailable
from pagein.sys._fd import OwnedFd

__all__ = ["HUGE_PAGE_SIZE", "PAGE_SIZE", "Advice", "Mapping", "Memfd", "hugetlb_free_pages",
           "hugetlb_pool", "hugetlb_pool_hint", "hugetlb_pool_size", "hugetlb_raise_hint",
           "map_count", "max_map_count"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUGE_PAGE_SIZE = 2 * 1024 * 1024


def _errno_check(ret: int, op: str, start: int, length: int, detail: str = "") -> None:
    if ret != 0:
        raise MappingError(op, libc.get_errno(), start, length, detail)


class Mapping:
    """One mmap'd range ``[address, address+length)`` that this object unmaps on close."""

    def __init__(self, address: int, length: int, *, page_size: int = PAGE_SIZE,
                 shared: bool = False, owned: bool = True) -> None:
        self.address = address
        self.length = length
        self.page_size = page_size
        self.shared = shared
        self._owned = owned
        self._closed = False

    # --- constructors --------------------------------------------------------------

    @classmethod
    def anonymous(cls, length: int, *, shared: bool = False, hugetlb: bool = False,
                  at: int | None = None, replace: bool = False, noreserve: bool = True,
                  populate: bool = False, prot: Prot = Prot.READ | Prot.WRITE) -> Mapping:
        """Map ``length`` bytes of anonymous memory (private unless ``shared``).

        ``at`` maps at that address: refusing to replace an existing mapping unless
        ``replace`` is set (MAP_FIXED_NOREPLACE vs MAP_FIXED). ``hugetlb`` uses 2 MiB
        pages from the ``vm.nr_hugepages`` pool.
        """
        flags = MapFlag.ANONYMOUS | (MapFlag.SHARED if shared else MapFlag.PRIVATE)
        if noreserve:
            flags |= MapFlag.NORESERVE
        if populate:
            flags |= MapFlag.POPULATE
        page = PAGE_SIZE
        if hugetlb:
            flags |= MapFlag.HUGETLB | MapFlag.HUGE_2MB
            page = HUGE_PAGE_SIZE
        return cls._map(length, prot, flags, -1, 0, at, replace, page, shared)

    @classmethod
    def of_fd(cls, fd: int, length: int, *, offset: int = 0, shared: bool = True,
              at: int | None = None, replace: bool = False, hugetlb: bool = False,
              prot: Prot = Prot.READ | Prot.WRITE, populate: bool = False,
              noreserve: bool = False) -> Mapping:
        """Map ``length`` bytes of a file or memfd from ``offset``.

        ``shared=False`` gives MAP_PRIVATE: reads come from the page cache, the first
        write to a page copies it (the file never changes). ``noreserve``: MAP_NORESERVE;
        without it a private hugetlbfs mapping reserves a huge page per page of its
        length at once, for the copies its writes might make.
        """
        flags = MapFlag.SHARED if shared else MapFlag.PRIVATE
        if populate:
            flags |= MapFlag.POPULATE
        if noreserve:
            flags |= MapFlag.NORESERVE
        page = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
        return cls._map(length, prot, flags, fd, offset, at, replace, page, shared)

    @classmethod
    def _map(cls, length: int, prot: Prot, flags: MapFlag, fd: int, offset: int,
             at: int | None, replace: bool, page: int, shared: bool) -> Mapping:
        if length <= 0 or length % page:
            raise ValueError(f"mapping length {length} must be a positive multiple of {page}")
        if at is not None:
            flags |= MapFlag.FIXED if replace else MapFlag.FIXED_NOREPLACE
        addr = libc.mmap(at or 0, length, int(prot), int(flags), fd, offset)
        if addr is None or addr == MAP_FAILED or addr == libc.VOID_P_FAILED:
            err = libc.get_errno()
            detail = ""
            if err == errno.ENOMEM and (flags & MapFlag.HUGETLB or page == HUGE_PAGE_SIZE):
                detail = (f"not enough free 2 MiB pages ({hugetlb_free_pages()} free): "
                          "raise sysctl vm.nr_hugepages")
            elif err == errno.EEXIST and at is not None:
                detail = "something is already mapped there: pass replace=True to replace it"
            raise MappingError("mmap", err, at or 0, length, detail)
        if at is not None and addr != at:
            libc.munmap(addr, length)
            raise MappingError("mmap", errno.EEXIST, at, length, "the kernel placed it elsewhere")
        return cls(int(addr), length, page_size=page, shared=shared)

    # --- access --------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self.address + self.length

    def view(self) -> memoryview:
        """Return a writable byte view of the whole mapping (see the module's Safety)."""
        self._alive()
        return libc.memory_view(self.address, self.length)

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``offset`` out of the mapping (GIL released).

        Safety: reading a uffd-registered range blocks until the page is served; the
        copy runs without the GIL, so a handler thread of this process can serve it.
        """
        self._bounds(offset, length)
        return libc.read_memory(self.address + offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the mapping at ``offset`` (GIL released, like :meth:`read`)."""
        n = memoryview(data).nbytes
        self._bounds(offset, n)
        libc.write_memory(self.address + offset, data)

    def madvise(self, advice: Advice, offset: int = 0, length: int | None = None) -> None:
        """``madvise(2)`` on part of the mapping (page-aligned)."""
        length = self.length - offset if length is None else length
        self._bounds(offset, length)
        _errno_check(libc.madvise(self.address + offset, length, int(advice)),
                     f"madvise({advice.name})", self.address + offset, length)

    def mprotect(self, prot: Prot, offset: int = 0, length: int | None = None) -> None:
        """``mprotect(2)`` on part of the mapping."""
        length = self.length - offset if length is None else length
        self._bounds(offset, length)
        _errno_check(libc.mprotect(self.address + offset, length, int(prot)), "mprotect",
                     self.address + offset, length)

    def mincore(self) -> bytes:
        """Return one byte per base page: bit 0 set when the page is resident."""
        self._alive()
        n = (self.length + PAGE_SIZE - 1) // PAGE_SIZE
        vec = libc.byte_vector(n)
        _errno_check(libc.mincore(self.address, self.length, vec), "mincore", self.address,
                     self.length)
        return bytes(vec)

    def resident_pages(self) -> int:
        """Count resident base pages (``mincore``)."""
        return sum(b & 1 for b in self.mincore())

    def move_to(self, new_address: int, *, keep_source: bool = False) -> None:
        """``mremap`` the mapping to ``new_address`` (MREMAP_DONTUNMAP when ``keep_source``)."""
        self._alive()
        flags = MremapFlag.MAYMOVE | MremapFlag.FIXED
        if keep_source:
            flags |= MremapFlag.DONTUNMAP
        ret = libc.mremap(self.address, self.length, self.length, int(flags), new_address)
        if ret is None or ret == libc.VOID_P_FAILED:
            raise MappingError("mremap", libc.get_errno(), self.address, self.length)
        self.address = int(ret)

    def _alive(self) -> None:
        if self._closed:
            raise ValueError("mapping is closed")

    def _bounds(self, offset: int, length: int) -> None:
        self._alive()
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"range +0x{offset:x}..+0x{offset + length:x} is outside the mapping of "
                f"0x{self.length:x} bytes at 0x{self.address:x}")

    # --- lifetime ------------------------------------------------------------------

    def release(self) -> int:
        """Stop owning the range (it stays mapped) and return its address."""
        self._closed = True
        self._owned = False
        return self.address

    def close(self) -> None:
        """Unmap (idempotent)."""
        if not self._closed:
            self._closed = True
            if self._owned:
                _errno_check(libc.munmap(self.address, self.length), "munmap", self.address,
                             self.length)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_owned", False):
            warnings.warn(f"unclosed Mapping at 0x{self.address:x}", ResourceWarning,
                          stacklevel=2)

    def __repr__(self) -> str:
        return f"Mapping(0x{self.address:x}, 0x{self.length:x})"


class Memfd(OwnedFd):
    """An anonymous memory file (``memfd_create(2)``), optionally backed by 2 MiB pages."""

    def __init__(self, fd: int, size: int, *, hugetlb: bool) -> None:
        super().__init__(fd)
        self.size = size
        self.hugetlb = hugetlb
        self.page_size = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE

    @classmethod
    def create(cls, name: str, size: int, *, hugetlb: bool = False) -> Memfd:
        """Create a memfd of ``size`` bytes (a multiple of the page size).

        ``hugetlb`` backs it with 2 MiB pages from the ``vm.nr_hugepages`` pool (pages are
        taken when first touched or filled, so reserve them first).
        """
        page = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
        if size <= 0 or size % page:
            raise ValueError(f"memfd size {size} must be a positive multiple of {page}")
        flags = MemfdFlag.CLOEXEC | MemfdFlag.ALLOW_SEALING
        if hugetlb:
            flags |= MemfdFlag.HUGETLB | MemfdFlag.HUGE_2MB
        try:
            fd = os.memfd_create(name, int(flags))
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise  # out of fds or memory: an ordinary OSError, not a missing feature
            need = ("a kernel with CONFIG_HUGETLBFS and 2 MiB pages" if hugetlb
                    else "a kernel with memfd_create (Linux >= 3.17)")
            raise Unavailable(f"memfd_create({name!r}) failed ({e.strerror}): this needs "
                              f"{need}") from e
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise MappingError("ftruncate(memfd)", e.errno or 0, 0, size) from e
        return cls(fd, size, hugetlb=hugetlb)

    def map(self, *, shared: bool = True, at: int | None = None, replace: bool = False,
            offset: int = 0, length: int | None = None, noreserve: bool = False) -> Mapping:
        """Map (part of) the memfd; shared by default, so every mapper sees one page cache."""
        return Mapping.of_fd(self.fileno(), self.size - offset if length is None else length,
                             offset=offset, shared=shared, at=at, replace=replace,
                             hugetlb=self.hugetlb, noreserve=noreserve)


def hugetlb_free_pages() -> int:
    """The default-size (2 MiB) pages a new mapping can get now: ``HugePages_Free``
    minus ``HugePages_Rsvd`` from /proc/meminfo (free pages already promised to a
    mapping that has not touched them yet are not available)."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(("HugePages_Free:", "HugePages_Rsvd:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return max(0, values.get("HugePages_Free", 0) - values.get("HugePages_Rsvd", 0))


def hugetlb_pool(page_size: int = HUGE_PAGE_SIZE) -> tuple[int, int] | None:
    """Return ``(free, may_add)`` pages of the hugetlb pool of ``page_size``: free now (and
    not reserved), and
    how many more the kernel may allocate on demand (``nr_overcommit_hugepages`` minus
    the surplus already taken). None when this kernel has no pool of that size.

    Read from ``/sys/kernel/mm/hugepages/hugepages-<N>kB/``.
    """
    base = f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB"
    try:
        values = {}
        for name in ("free_hugepages", "resv_hugepages", "nr_overcommit_hugepages",
                     "surplus_hugepages"):
            with open(f"{base}/{name}") as f:
                values[name] = int(f.read())
    except (OSError, ValueError):
        return None
    may_add = max(0, values["nr_overcommit_hugepages"] - values["surplus_hugepages"])
    # Free pages reserved for mappings that have not touched them yet are not free.
    return max(0, values["free_hugepages"] - values["resv_hugepages"]), may_add


def hugetlb_pool_size(page_size: int = HUGE_PAGE_SIZE) -> int | None:
    """The pool's configured size in pages of ``page_size`` (``nr_hugepages`` in
    ``/sys/kernel/mm/hugepages/hugepages-<N>kB/``), None when the kernel has no such pool."""
    try:
        with open(f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/nr_hugepages") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def hugetlb_raise_hint(page_size: int = HUGE_PAGE_SIZE) -> str:
    """How to give the hugetlb pool of ``page_size`` more pages."""
    kib = page_size // 1024
    return (f"raise vm.nr_hugepages (or /sys/kernel/mm/hugepages/hugepages-{kib}kB/"
            "nr_hugepages)")


def hugetlb_pool_hint(page_size: int = HUGE_PAGE_SIZE) -> str:
    """The advice for a hugetlb fill that found no free page of ``page_size``."""
    return (f"the hugetlb pool has no free {page_size // 1024} KiB page; "
            f"{hugetlb_raise_hint(page_size)}")


def map_count() -> int:
    """The memory mappings (VMAs) this process has now: the lines of /proc/self/maps."""
    with open("/proc/self/maps", "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))


def max_map_count() -> int:
    """The kernel's limit on a process's mappings (sysctl ``vm.max_map_count``); an
    ``mmap`` past it fails with ENOMEM."""
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())
