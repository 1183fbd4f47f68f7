"""Mechanism probe, not a pagein figure: KVM's dirty log against uffd write-protect
(``UFFD_FEATURE_WP_ASYNC``) as dirty trackers, each armed by hand on one guest memory.

pagein's own figure for the cost of dirty tracking on a running guest (a burst of
requests with tracking on vs off, as `pagein vm run` tracks) is in
benchmarks/vm_diff.py. This probe compares the two kernel mechanisms the choice of
tracker rests on.

Run: ``.venv/bin/python benchmarks/dirty_trackers.py [MIB]`` (default 256). One guest
memory of MIB, every page populated; a guest (`scan` workload, ``op=write``) writes
``TOUCHES`` random pages. For each tracker, in the same run: the guest's time for the
writes with the tracker armed against unarmed, and the time to collect (and re-arm)
the set of written pages. The uffd tracker reads the written pages from
``/proc/self/pagemap`` (bit 57, ``PM_UFFD_WP``, is clear once a page was written);
``PAGEMAP_SCAN`` would read them without a 8-byte entry per page. Which one pagein
uses, and why, is in docs/restore.md ("Diff snapshots and chains").
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.workloads import parse_workload

MiB = 1 << 20
TOUCHES = 20000
_UFFD_WP_BIT = np.uint64(1 << 57)


def guest_run(mem: int, tracker: str) -> tuple[float, float, int]:
    """(guest seconds for the writes, seconds to collect + re-arm, pages found dirty)."""
    wl = parse_workload("scan", ["pattern=random", "op=write", f"size={(mem >> 20) - 32}M",
                                 f"touches={TOUCHES}"])
    with Machine.create(mem, 1) as m:
        region = m.memory.regions[0].mapping
        region.write(0, b"\1" * region.length)  # every page present, as after a restore
        uffd = None
        if tracker == "kvm":
            m.enable_dirty_tracking()
        elif tracker == "uffd-wp":
            uffd = Userfaultfd.open(Feature.WP_ASYNC)
            uffd.register(region.address, region.length, RegisterMode.WP)
            uffd.writeprotect(region.address, region.length)
        m.boot(workload_image("scan"), wl.args, min_heap_bytes=wl.min_heap_bytes)
        if m.dirty is not None:
            m.dirty.take()  # boot's own writes do not count
        m.start()
        result = m.wait(300)
        t = time.perf_counter()
        found = 0
        if m.dirty is not None:
            found = int(m.dirty.take().sum())
        elif uffd is not None:
            with Pagemap() as pm:
                e = np.frombuffer(pm.entries(region.address, region.length), dtype=np.uint64)
            found = int(np.count_nonzero((e & _UFFD_WP_BIT) == 0))
            uffd.writeprotect(region.address, region.length)
        collect = time.perf_counter() - t
        if uffd is not None:
            uffd.close()
        return result.run_seconds, collect, found


def main() -> None:
    mem = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 256 * MiB
    base = min(guest_run(mem, "none")[0] for _ in range(2))
    for tracker in ("kvm", "uffd-wp"):
        runs = [guest_run(mem, tracker) for _ in range(2)]
        best = min(runs)
        print(f"probe {tracker:8} guest {best[0] * 1e3:.1f} ms ({best[0] / base:.2f}x untracked "
              f"{base * 1e3:.1f} ms), collect {best[1] * 1e3:.2f} ms, {best[2]} pages dirty")


if __name__ == "__main__":
    main()
