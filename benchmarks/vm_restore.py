"""VM restore benchmark: copy vs file mapping vs userfaultfd, as guest memory grows.

Run: ``.venv/bin/python benchmarks/vm_restore.py`` (256 MiB, 1 GiB and 4 GiB guests in
one run) or ``--quick`` (64 and 256 MiB). Needs /dev/kvm.

For each guest size it boots the built-in ``function`` guest with a quarter of its RAM
as state (records + hash table; the rest of RAM is never touched, as in a real guest),
snapshots it at READY, and restores the snapshot with each method:

- ``copy``: fresh anonymous memory, the memory file's data extents read in first (holes
  are skipped: a strong baseline);
- ``file``: the memory file mapped MAP_PRIVATE;
- ``uffd, <strategy>``: anonymous memory registered with userfaultfd and handed to a
  ``pagein serve`` that is already listening (a fleet's daemon, started before the clock).

Measured from the start of each restore: resume (vCPUs running), the first answer (a
lookup: a few pages), the all-state answer (a checksum over every record and slot), and
guest memory present in the VMM afterwards. Every restored guest's answers are checked
against the original guest's. Ratios are against ``copy`` of the same size in the same
run; the uffd resume must stay flat as memory grows (last table). The process and its
handler children are pinned to the same CPUs for every measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from pagein.cli._format import parse_size, table
from pagein.demo import (
    VM_METHODS,
    VmMethod,
    VmRestoreRun,
    measure_restore,
    snapshot_function_guest,
)
from pagein.vmm.reference import FunctionReference

MiB = 1 << 20


def _median_run(runs: list[VmRestoreRun]) -> VmRestoreRun:
    """The run with the median resume time (all its fields come from one restore)."""
    return sorted(runs, key=lambda r: r.resume_s)[len(runs) // 2]


def bench_size(mem: int, methods: tuple[VmMethod, ...], repeat: int, vcpus: int,
               workdir: str | None, cold: bool,
               timeout: float) -> tuple[float, list[VmRestoreRun]]:
    state = mem // 4
    ref = FunctionReference(state, 1, vcpus)
    requests = (f"get {ref.key(ref.records // 3)}", "checksum")
    want = (ref.answer(requests[0]), ref.answer(requests[1]))
    with tempfile.TemporaryDirectory(prefix="pagein-bench-vm-", dir=workdir) as d:
        t0 = time.perf_counter()
        _, _, answers = snapshot_function_guest(d, state, mem, vcpus, requests)
        setup = time.perf_counter() - t0
        if answers != want:
            raise SystemExit(f"the original guest answered {answers}, the reference {want}")
        out = []
        for method in methods:
            runs = []
            for _ in range(repeat):
                if cold:
                    os.sync()
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("1\n")
                runs.append(measure_restore(d, method, requests, want, timeout))
            if not all(r.answers_match for r in runs):
                raise SystemExit(f"{method.label} at {mem >> 20} MiB: a restored guest "
                                 "answered differently from the original")
            out.append(_median_run(runs))
            print(f"  {mem >> 20:>5} MiB  {method.label:<22} resume "
                  f"{out[-1].resume_s * 1e3:8.1f} ms  all-state {out[-1].all_state_s:7.2f} s",
                  file=sys.stderr, flush=True)
    return setup, out


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def _ratio(base: float, x: float) -> str:
    if x <= 0:
        return "-"
    r = base / x
    return f"{r:,.1f}x" if r >= 1 else f"{r:.2f}x"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB and 256 MiB guests only")
    p.add_argument("--sizes", help="comma-separated guest sizes (default 256M,1G,4G)")
    p.add_argument("--repeat", type=int, default=1, help="restores per method (median)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--methods", default="all",
                   help="comma-separated labels' first words: copy,file,uffd (default all)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before every restore (root)")
    p.add_argument("--workdir", help="where snapshots are written (default /tmp)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="longest wait for one answer (uffd on-demand at 4 GiB takes minutes)")
    args = p.parse_args()
    sizes = [parse_size(s) for s in (args.sizes or ("64M,256M" if args.quick
                                                    else "256M,1G,4G")).split(",")]
    methods = VM_METHODS if args.methods == "all" else tuple(
        m for m in VM_METHODS if m.backend.value in args.methods.split(","))
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)  # children (the handlers) inherit the same set
    results: dict[int, list[VmRestoreRun]] = {}
    for mem in sizes:
        setup, runs = bench_size(mem, methods, args.repeat, args.vcpus, args.workdir,
                                 args.cold, args.timeout)
        print(f"  {mem >> 20:>5} MiB  boot + snapshot {setup:.1f} s", file=sys.stderr)
        results[mem] = runs
    print(f"\nfunction guest, state = RAM/4, {args.vcpus} vCPU(s), pinned to CPUs {cpus}, "
          f"{'cold' if args.cold else 'warm'} page cache, median of {args.repeat}; times in ms "
          "from the start of the restore; ratio = copy's time / this one's (higher is "
          "better)\n")
    rows = []
    for mem, runs in results.items():
        base = runs[0]
        for r in runs:
            rows.append([f"{mem >> 20} MiB", r.method, _ms(r.resume_s), _ratio(base.resume_s,
                         r.resume_s), _ms(r.first_answer_s),
                         _ratio(base.first_answer_s, r.first_answer_s), _ms(r.all_state_s),
                         _ratio(base.all_state_s, r.all_state_s),
                         f"{r.present_bytes / MiB:,.0f}"])
    print(table(["RAM", "restore", "resume", "vs copy", "first answer", "vs copy",
                 "all-state", "vs copy", "present MiB"], rows))
    print("\nresume latency as memory grows (ratio to the smallest guest):\n")
    labels = [r.method for r in results[sizes[0]]]
    flat = []
    for i, label in enumerate(labels):
        times = [results[m][i].resume_s for m in sizes]
        flat.append([label, *(_ms(t) for t in times), f"{times[-1] / times[0]:.2f}x"])
    print(table(["restore", *(f"{m >> 20} MiB" for m in sizes), "largest/smallest"], flat))
    uffd = [i for i, label in enumerate(labels) if label.startswith("uffd")]
    if uffd:
        med = statistics.median(results[sizes[-1]][i].resume_s / results[sizes[0]][i].resume_s
                                for i in uffd)
        print(f"\nuffd resume, largest/smallest guest: {med:.2f}x (median over strategies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
