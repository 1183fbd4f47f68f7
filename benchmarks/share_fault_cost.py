"""Mechanism probe, not a pagein figure: the native engine's per-fault cost of
UFFDIO_CONTINUE (--share-pages) against UFFDIO_COPY, with a client of its own.

pagein's figure for shared clones, driven as users run them (`pagein serve` started from
the CLI, `pagein vm restore --share-pages` guests, unpinned and pinned, with the
server's µs per fault), is benchmarks/vm_share.py. This probe isolates the ioctl path.

Run: ``.venv/bin/python benchmarks/share_fault_cost.py`` (64 MiB, 3 runs per case).

One ``pagein serve --engine native --workers 1`` per case serves a client in this
process that does what a VMM does (``tests/fcclient.py`` in short): private anonymous
memory registered MISSING (``copy``), or a MAP_PRIVATE mapping of the server's page
cache registered MISSING|MINOR (``--share-pages``). One ``memmove`` of the whole region
(GIL released) then faults on every page in order; the time per page is its wall time
divided by the pages. ``share, cold`` is a clone whose cache is empty (each fault: pwrite
the page into the cache, then CONTINUE), ``share, warm`` the next clones (CONTINUE
only), alternating with ``copy`` clients on the same server. The memory file is random
bytes (no holes: no zero pages). Cases run on one CPU (``taskset -c 0`` for the server,
this process pinned to CPU 0), on two CPUs (server 1, client 0) and unpinned. Ratios
are against ``copy`` of the same placement and run.

Beside it, the two ways to put a page into the cache, per 4 KiB page and one call per
page as the core does: ``pwrite`` into the memfd, and a store through a shared mapping
of it (a page fault allocates the page first).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pagein._abi import libc
from pagein.cli._format import parse_size, table
from pagein.serve.firecracker import Region, connect_and_send
from pagein.serve.pagecache import request_page_cache
from pagein.sys.mapping import PAGE_SIZE, Mapping, Memfd
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

MiB = 1 << 20
PLACEMENTS = {"one CPU": ("0", {0}), "two CPUs": ("1", {0}), "unpinned": (None, None)}


@contextmanager
def _server(mem: str, sock: str, cpu: str | None) -> Iterator[None]:
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "pagein", "serve", "--socket", sock, "--mem-file", mem,
           "--engine", "native", "--workers", "1", "--ready-fd", str(w)]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, pass_fds=(w,), stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        if not (select.select([r], [], [], 60)[0] and os.read(r, 16)):
            raise SystemExit("pagein serve did not start")
        os.close(r)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _touch(sock: str, size: int, share: bool, sink: Mapping) -> float:
    """Restore one client and fault in all of it; return µs per page."""
    features = Feature.EVENT_REMOVE
    mode = RegisterMode.MISSING
    if share:
        cache = request_page_cache(sock, PAGE_SIZE, need_bytes=size)
        with cache.memfd:
            m = cache.memfd.map(shared=False, length=size, noreserve=True)
        features |= Feature.MINOR_SHMEM | Feature.MISSING_SHMEM
        mode |= RegisterMode.MINOR
    else:
        m = Mapping.anonymous(size, noreserve=True)
    with m, Userfaultfd.open(features) as uffd:
        uffd.register(m.address, size, mode)
        conn = connect_and_send(sock, [Region(m.address, size, 0, PAGE_SIZE)], uffd)
        try:
            t0 = time.perf_counter()
            libc.memmove(sink.address, m.address, size)  # faults page by page, in order
            dt = time.perf_counter() - t0
        finally:
            conn.close()
    return dt / (size // PAGE_SIZE) * 1e6


def _fill_costs(size: int, runs: int) -> tuple[float, float]:
    """µs per 4 KiB page to put it into a fresh memfd: pwrite, and a store via mmap
    (median of ``runs``, the two alternating)."""
    src = os.urandom(PAGE_SIZE)
    pages = size // PAGE_SIZE
    pw, st = [], []
    for _ in range(runs):
        with Memfd.create("bench-pwrite", size) as fd:
            t0 = time.perf_counter()
            for p in range(pages):
                os.pwrite(fd.fileno(), src, p * PAGE_SIZE)
            pw.append((time.perf_counter() - t0) / pages * 1e6)
        with Memfd.create("bench-store", size) as fd, fd.map() as m:
            view = m.view()
            t0 = time.perf_counter()
            for p in range(pages):
                view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = src
            st.append((time.perf_counter() - t0) / pages * 1e6)
            view.release()
    return statistics.median(pw), statistics.median(st)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=64 * MiB)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    size = args.size
    rows = []
    with tempfile.TemporaryDirectory(prefix="pagein-bench-cost-") as d:
        mem = os.path.join(d, "memory")
        with open(mem, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        sink = Mapping.anonymous(size)
        ctypes.memset(sink.address, 1, size)  # written once: no faults on the sink later
        before = os.sched_getaffinity(0)
        try:
            for name, (server_cpu, mine) in PLACEMENTS.items():
                os.sched_setaffinity(0, mine or before)
                got: dict[str, list[float]] = {"copy": [], "cold": [], "warm": []}
                for run in range(args.runs):
                    sock = os.path.join(d, f"s{run}-{len(rows)}.sock")
                    with _server(mem, sock, server_cpu):
                        # The cold clone first (it fills the cache), then warm clones and
                        # private ones alternately, so load that comes and goes on a
                        # shared machine falls on both alike.
                        got["cold"].append(_touch(sock, size, True, sink))
                        for _ in range(2):
                            got["copy"].append(_touch(sock, size, False, sink))
                            got["warm"].append(_touch(sock, size, True, sink))
                med = {k: statistics.median(v) for k, v in got.items()}
                spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in got.items()}
                rows.append([name, f"{med['copy']:.1f}", f"{med['cold']:.1f}",
                             f"{med['warm']:.1f}", f"{med['cold'] / med['copy']:.2f}x",
                             f"{med['warm'] / med['copy']:.2f}x",
                             f"{max(spread.values()) * 100:.0f}%"])
                print(f"  {name}: {got}", file=sys.stderr, flush=True)
        finally:
            os.sched_setaffinity(0, before)
            sink.close()
    pw, st = _fill_costs(size, 2 * args.runs + 1)
    print(f"native engine, {size >> 20} MiB, 4 KiB faults in order, median of {args.runs} "
          "servers (copy and warm: 2 clients each per server; µs per page)")
    print(table(["placement", "copy", "share, cold", "share, warm", "cold / copy",
                 "warm / copy", "max spread"], rows))
    print(f"cache fill, per 4 KiB page: pwrite {pw:.2f} µs, store through a mapping "
          f"{st:.2f} µs ({st / pw:.2f}x)")
    print("target: warm / copy <= 1.00 (CONTINUE per fault no dearer than COPY)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
