"""Dirty tracking: which guest pages changed since the last snapshot.

Two writers change guest memory and both are tracked:

* the guest, through KVM's dirty log (``KVM_MEM_LOG_DIRTY_PAGES`` on every memory slot,
  read and cleared with ``KVM_GET_DIRTY_LOG``, as Firecracker's ``track_dirty_pages``):
  KVM write-protects the slot and records the first write to each page;
* the VMM itself (boot tables, console lines copied into guest buffers, results), which
  KVM never sees: :meth:`GuestMemory.write` reports each write to :meth:`DirtyLog.mark`.

Pages a userfaultfd handler fills are not written by the guest, so a lazily restored
VM's never-touched pages stay clean: they are the parent's by definition.

Why not uffd write-protect (``UFFD_FEATURE_WP_ASYNC`` + ``PAGEMAP_SCAN``, Linux 6.7+)?
It needs a uffd registered in WP mode in this process, which the copy and file
backends lack and the uffd backend hands to another process; KVM's log covers every
backend alike. Measured on this kernel (benchmarks/dirty_trackers.py), the two cost
about the same per tracked write, and the KVM log is collected ~10x faster than
reading the uffd-wp bits from /proc/self/pagemap (docs/restore.md).
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

from pagein._abi.kvm import MemFlag
from pagein.sys.kvm import Vm
from pagein.sys.mapping import PAGE_SIZE
from pagein.vmm.memory import GuestMemory

__all__ = ["DirtyLog"]

Bits = npt.NDArray[np.bool_]


class DirtyLog:
    """Track the pages of ``memory`` (slots 0..n-1 of ``vm``) written since :meth:`take`."""

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self._vm = vm
        self._memory = memory
        self._lock = threading.Lock()
        self._pages = [r.size // PAGE_SIZE for r in memory.regions]
        self._starts = np.cumsum([0, *self._pages])
        self._vmm = np.zeros(int(self._starts[-1]), dtype=bool)
        for slot, region in enumerate(memory.regions):
            # Re-registering a slot with the flag turns logging on; the log starts empty.
            vm.set_memory_region(slot, region.guest_phys, region.mapping,
                                 MemFlag.LOG_DIRTY_PAGES)
        memory.on_write = self.mark

    def mark(self, guest_phys: int, length: int) -> None:
        """Record a write the VMM made (KVM's log only has the guest's)."""
        if length <= 0:
            return
        for i, r in enumerate(self._memory.regions):
            a, b = max(guest_phys, r.guest_phys), min(guest_phys + length, r.guest_phys + r.size)
            if a < b:
                first = int(self._starts[i]) + (a - r.guest_phys) // PAGE_SIZE
                last = int(self._starts[i]) + -(-(b - r.guest_phys) // PAGE_SIZE)
                with self._lock:
                    self._vmm[first:last] = True

    def take(self) -> Bits:
        """Pages written since the last call (one bool per page, memory-file order), and
        start over. Call with the vCPUs paused, so no write falls between the two logs."""
        out = np.empty_like(self._vmm)
        for slot, n in enumerate(self._pages):
            raw = self._vm.get_dirty_log(slot, n)
            bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
            out[self._starts[slot]: self._starts[slot + 1]] = bits.astype(bool)
        with self._lock:
            out |= self._vmm
            self._vmm[:] = False
        return out

    def give_back(self, pages: Bits) -> None:
        """Put pages taken by :meth:`take` back (a snapshot that used them failed)."""
        with self._lock:
            self._vmm |= pages

    def close(self) -> None:
        if self._memory.on_write == self.mark:
            self._memory.on_write = None
