"""Restore strategies side by side: eager read(), MAP_PRIVATE, and pagein's strategies.

For one snapshot (1 GiB by default, 128 MiB with --quick) and each restore method, on a
warm and a cold page cache, with sequential and random touch orders, it measures:

- first byte: from the start of the restore until the first page is readable;
- 10% / 100%: until 10% / all of the pages (in that order) have been read.

pagein runs as Firecracker runs it: a ``pagein serve`` process started once per
strategy (like a host's handler daemon) and, per restore, this process maps fresh
memory, registers it with a new uffd and sends it over the socket. Pages are touched by
a small C loop called through ctypes (no Python per page). The toucher is pinned to
CPU 0 and the handler (all its processes) to CPU 1 in every run; the eager and MAP_PRIVATE
baselines have no handler (``--cpus same`` puts the handler on the toucher's CPU:
cross-CPU wakeups are expensive in VMs; ``--cpus none`` pins neither, as users run it).
Ratios are against eager read() with the same cache state and order.

Run: ``.venv/bin/python benchmarks/restore_strategies.py [--quick] [--size-mib N] [--repeat 3]
[--cpus split|same|none]``
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from _pagecache import drop_cache, warm_cache  # benchmarks/ is on sys.path

from pagein.serve.firecracker import Region, connect_and_send
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

TOUCH_C = r"""
#include <stddef.h>
#include <stdint.h>
uint64_t touch(const volatile uint8_t *base, const uint64_t *offs, size_t n) {
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) sum += base[offs[i]];
    return sum;
}
"""


def build_toucher(workdir: str) -> Callable[[int, ctypes.Array[ctypes.c_uint64], int, int], int]:
    src = os.path.join(workdir, "touch.c")
    lib = os.path.join(workdir, "touch.so")
    with open(src, "w") as f:
        f.write(TOUCH_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
    fn = ctypes.CDLL(lib).touch
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def touch(base: int, offs: ctypes.Array[ctypes.c_uint64], start: int, end: int) -> int:
        return int(fn(base, ctypes.addressof(offs) + start * 8, end - start))
    return touch


def write_snapshot(path: str, size: int) -> None:
    """Random pages with every 8th page a hole, as untouched guest memory often is."""
    rng = random.Random(1)
    block = 8 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, block):
            chunk = bytearray(rng.randbytes(block))
            for p in range(7, block // PAGE_SIZE, 8):
                chunk[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
            f.seek(off)
            f.write(chunk)
        os.fsync(f.fileno())


@dataclass
class Timing:
    first: float
    ten: float
    full: float


class Handler:
    """A long-lived ``pagein serve`` process for one strategy, on the CPUs ``cpus``.

    ``taskset`` sets them before ``pagein serve`` starts, so its worker processes (which
    serve the faults) inherit them: pinning the supervisor's pid afterwards would not.
    """

    def __init__(self, workdir: str, path: str, strategy: str, cpus: set[int]) -> None:
        self.sock = os.path.join(workdir, f"{strategy}.sock")
        r, w = os.pipe()
        cpu_list = ",".join(str(c) for c in sorted(cpus))
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu_list, sys.executable, "-m", "pagein", "serve",
             "--socket", self.sock, "--mem-file", path, "--strategy", strategy,
             "--ready-fd", str(w)], pass_fds=(w,))
        os.close(w)
        ok = select.select([r], [], [], 30)[0] and os.read(r, 8)
        os.close(r)
        if not ok:
            self.proc.kill()
            raise RuntimeError(f"pagein serve --strategy {strategy} did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def run_one(method: str, path: str, size: int, offs: ctypes.Array[ctypes.c_uint64],
            touch: Callable[..., int], handlers: dict[str, Handler]) -> Timing:
    n = len(offs)
    ten = max(1, n // 10)
    t0 = time.perf_counter()
    cleanup: list[Callable[[], None]] = []
    if method == "eager read()":
        mem = Mapping.anonymous(size)
        with open(path, "rb", buffering=0) as f:
            view = mem.view()
            done = 0
            while done < size:
                done += f.readinto(view[done:]) or 0
            del view
        base = mem.address
        cleanup.append(mem.close)
    elif method == "MAP_PRIVATE file":
        fd = os.open(path, os.O_RDONLY)
        mem = Mapping.of_fd(fd, size, shared=False)
        os.close(fd)
        base = mem.address
        cleanup.append(mem.close)
    else:
        mem = Mapping.anonymous(size)
        uffd = Userfaultfd.open(Feature.EVENT_REMOVE)
        uffd.register(mem.address, size, RegisterMode.MISSING)
        sock = connect_and_send(handlers[method].sock, [Region(mem.address, size, 0)], uffd)
        base = mem.address
        # Unmap first so nothing can fault once the handler lets go.
        cleanup += [mem.close, sock.close, uffd.close]
    touch(base, offs, 0, 1)
    t1 = time.perf_counter()
    touch(base, offs, 1, ten)
    t2 = time.perf_counter()
    touch(base, offs, ten, n)
    t3 = time.perf_counter()
    for fn in cleanup:
        fn()
    return Timing(t1 - t0, t2 - t0, t3 - t0)


def prepare_cache(cache: str, m: str, path: str, handlers: dict[str, Handler],
                  strategies: list[str], tmp: str, cpus: set[int]) -> None:
    """Put the page cache (and the handlers) in the state one run of a cell starts from."""
    if cache == "cold":
        # A handler that has read the file keeps its pages mapped, and mapped pages
        # survive FADV_DONTNEED: start a fresh one.
        for h in handlers.values():
            h.close()
        if m in strategies:
            handlers[m] = Handler(tmp, path, m, cpus)
        drop_cache(path)
    else:
        warm_cache(path)


def run_repeated(repeat: int, m: str, path: str, size: int, offs: ctypes.Array[ctypes.c_uint64],
                 touch: Callable[..., int], handlers: dict[str, Handler], cache: str,
                 strategies: list[str], tmp: str, cpu: int) -> Timing:
    """Run one cell ``repeat`` times (fresh memory, same cache state) and keep the median."""
    runs = []
    for _ in range(repeat):
        prepare_cache(cache, m, path, handlers, strategies, tmp, cpu)
        runs.append(run_one(m, path, size, offs, touch, handlers))
    runs.sort(key=lambda t: t.full)
    return runs[len(runs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    ap.add_argument("--size-mib", type=int)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is kept")
    ap.add_argument("--cpus", choices=["split", "same", "none"], default="split",
                    help="handler on another CPU than the toucher (default), the same one, "
                         "or neither pinned (what users run)")
    args = ap.parse_args()
    size = (args.size_mib or (128 if args.quick else 1024)) << 20
    cpus = sorted(os.sched_getaffinity(0))
    handler_cpus = set(cpus) if args.cpus == "none" else \
        {cpus[0] if args.cpus == "same" else cpus[-1]}
    if args.cpus != "none":
        os.sched_setaffinity(0, {cpus[0]})  # the toucher
    strategies = ["on-demand", "readahead", "populate-all"]
    methods = ["eager read()", "MAP_PRIVATE file", *strategies]
    with tempfile.TemporaryDirectory(prefix="pagein-bench-", dir=args.workdir) as tmp:
        path = os.path.join(tmp, "mem.snap")
        write_snapshot(path, size)
        touch = build_toucher(tmp)
        pages = size // PAGE_SIZE
        seq = (ctypes.c_uint64 * pages)(*(i * PAGE_SIZE for i in range(pages)))
        order = list(range(pages))
        random.Random(2).shuffle(order)
        rnd = (ctypes.c_uint64 * pages)(*(i * PAGE_SIZE for i in order))
        handlers = {s: Handler(tmp, path, s, handler_cpus) for s in strategies}
        rows = []
        try:
            for cache in ("warm", "cold"):
                for pattern, offs in (("seq", seq), ("random", rnd)):
                    base: Timing | None = None
                    for m in methods:
                        t = run_repeated(args.repeat, m, path, size, offs, touch, handlers,
                                         cache, strategies, tmp, handler_cpus)
                        base = base or t
                        rows.append((cache, pattern, m, t, base))
                        print(f"{cache:5} {pattern:6} {m:17} first {t.first * 1e3:9.2f} ms  "
                              f"10% {t.ten * 1e3:9.1f} ms  100% {t.full * 1e3:9.1f} ms",
                              file=sys.stderr, flush=True)
        finally:
            for h in handlers.values():
                h.close()
    where = "unpinned" if args.cpus == "none" else \
        f"toucher CPU {cpus[0]}, handler CPU {min(handler_cpus)}"
    print(f"\nsnapshot {size >> 20} MiB ({pages} pages, 1/8 holes); {where}; "
          "ratio = time / eager read() (same cache, order)\n")
    print("| cache | order | method | first byte ms | x eager | 10% ms | x eager | "
          "100% ms | x eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for cache, pattern, m, t, b in rows:
        print(f"| {cache} | {pattern} | {m} | {t.first * 1e3:.2f} | {t.first / b.first:.3f} | "
              f"{t.ten * 1e3:.1f} | {t.ten / b.ten:.2f} | {t.full * 1e3:.1f} | "
              f"{t.full / b.full:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
