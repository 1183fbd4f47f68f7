"""Guest RAM: regions of host memory, each a KVM memory slot at a guest-physical address.

Memory is made by :meth:`GuestMemory.create` (anonymous private, a shared memfd, or
2 MiB hugetlb) or supplied by the caller with :meth:`GuestMemory.from_mappings` — e.g. a
restore that already mapped a snapshot file or registered the range with userfaultfd.
Only memory this object created is unmapped on close.

Safety: :meth:`read` / :meth:`write` copy with the GIL released (``Mapping.read`` /
``Mapping.write``), so a VMM access to a page that is still missing in uffd-registered memory waits
for the handler without freezing the other Python threads — including a handler thread
in this same process (docs/serve.md, "Library use": the GIL).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pagein.sys.mapping import HUGE_PAGE_SIZE, Mapping, Memfd
from pagein.vmm.hugepages import check_hugetlb_pool


class Backing(enum.Enum):
    """How fresh guest memory is backed."""

    ANONYMOUS = "anonymous"   # MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, like Firecracker
    SHARED = "shared"         # a memfd mapped MAP_SHARED: other processes can map it too
    HUGETLB = "hugetlb"       # MAP_HUGETLB|MAP_HUGE_2MB from vm.nr_hugepages


@dataclass(frozen=True, slots=True)
class Region:
    """``mapping`` appears to the guest at ``guest_phys``."""

    guest_phys: int
    mapping: Mapping

    @property
    def size(self) -> int:
        return self.mapping.length


class GuestMemory:
    """The guest's RAM as regions (Firecracker's raw memory file stores them back to back)."""

    def __init__(self, regions: list[Region], *, owned: bool, memfd: Memfd | None = None):
        self.regions = tuple(sorted(regions, key=lambda r: r.guest_phys))
        self._owned = owned
        self.memfd = memfd
        self._closed = False
        # Told (guest_phys, length) after every VMM write: the dirty log (vmm/dirty.py)
        # records them, since KVM only logs the guest's own writes.
        self.on_write: Callable[[int, int], None] | None = None

    @classmethod
    def create(cls, size: int, backing: Backing = Backing.ANONYMOUS) -> GuestMemory:
        """Allocate ``size`` bytes of guest RAM at guest-physical 0."""
        if backing is Backing.SHARED:
            memfd = Memfd.create("pagein-guest", size)
            try:
                mapping = memfd.map(shared=True)
            except BaseException:
                memfd.close()
                raise
            return cls([Region(0, mapping)], owned=True, memfd=memfd)
        # Hugetlb pages are reserved at mmap (no MAP_NORESERVE), so the guest never meets
        # an empty pool inside KVM_RUN; the pool is checked first for a message that says
        # how many pages to add (mmap's ENOMEM alone does not).
        hugetlb = backing is Backing.HUGETLB
        if hugetlb:
            check_hugetlb_pool(f"a {size >> 20} MiB guest in 2 MiB hugetlb pages",
                               size // HUGE_PAGE_SIZE)
        mapping = Mapping.anonymous(size, hugetlb=hugetlb, noreserve=not hugetlb)
        return cls([Region(0, mapping)], owned=True)

    @classmethod
    def from_mappings(cls, regions: list[Region]) -> GuestMemory:
        """Use caller-made mappings as guest RAM; the caller keeps ownership."""
        return cls(regions, owned=False)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """End of the highest region: the top of guest-physical RAM."""
        last = self.regions[-1]
        return last.guest_phys + last.size

    def _locate(self, guest_phys: int, length: int) -> tuple[Mapping, int]:
        for r in self.regions:
            if r.guest_phys <= guest_phys and guest_phys + length <= r.guest_phys + r.size:
                return r.mapping, guest_phys - r.guest_phys
        raise ValueError(f"guest range 0x{guest_phys:x}+0x{length:x} is not inside one "
                         "RAM region")

    def contains(self, guest_phys: int, length: int) -> bool:
        try:
            self._locate(guest_phys, length)
        except ValueError:
            return False
        return True

    def read(self, guest_phys: int, length: int) -> bytes:
        """Copy guest bytes out (GIL released during the copy)."""
        mapping, off = self._locate(guest_phys, length)
        return mapping.read(off, length)

    def write(self, guest_phys: int, data: bytes) -> None:
        """Copy bytes into the guest (GIL released during the copy)."""
        mapping, off = self._locate(guest_phys, len(data))
        mapping.write(off, data)
        if self.on_write is not None:
            self.on_write(guest_phys, len(data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            for r in self.regions:
                r.mapping.close()
            if self.memfd is not None:
                self.memfd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
