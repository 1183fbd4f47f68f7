"""Clones sharing memory: N VMs from one snapshot, each touching all its state.

Run: ``.venv/bin/python benchmarks/vm_share.py`` (8 clones of a 256 MiB-state
``function`` guest) or ``--quick`` (4 clones, 64 MiB). Needs /dev/kvm.

It snapshots the ``function`` guest at READY, starts one ``pagein serve`` for the
snapshot (as a fleet's daemon, before the clock), and restores N clones one after the
other with each method, every clone answering ``checksum`` (which reads every record and
table slot) and staying alive until all N have answered:

- ``uffd``: today's private uffd restore (``UFFDIO_COPY`` into each clone's memory);
- ``uffd --share-pages``: each clone maps the server's page cache MAP_PRIVATE and its
  faults are ``UFFDIO_CONTINUE`` of pages filled once;
- ``file``: the memory file mapped MAP_PRIVATE (the kernel's page cache, Firecracker's
  File backend).

Host memory of guest RAM is the sum of the proportional set size (``Pss`` in
``/proc/PID/smaps``) of every mapping of it: the clones' guest mappings (all in this
process) and the server's mappings of its cache. Pss divides each page among all who
map it, so the sum counts a shared page once and a private page once per clone.
Ratios are against one private uffd clone in the same run. Every answer is checked
against the original guest's; a mismatch aborts the run. The second clone's checksum
time against the first's shows the warm cache; the share/private time ratio of clone 2
is the cost of a CONTINUE fault against a COPY fault.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from pagein.cli._format import parse_size, table
from pagein.demo import snapshot_function_guest
from pagein.sys.process import descendants
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore

MiB = 1 << 20


@dataclass(frozen=True)
class Method:
    label: str
    options: RestoreOptions


@dataclass(frozen=True)
class Result:
    label: str
    pss_bytes: int
    first_s: float  # restore + checksum of clone 1
    second_s: float  # the same for clone 2


def _pss(pid: int | str, want: object) -> int:
    """Sum of Pss over the mappings of ``pid`` that ``want(start, path)`` selects."""
    total, take = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                take = bool(want(int(head.split("-")[0], 16), path))  # type: ignore[operator]
            elif take and head == "Pss:":
                total += int(line.split()[1]) * 1024
    return total


def _host_bytes(clones: list[RestoredVm], server_pid: int) -> int:
    starts = {m.address for vm in clones for m in vm.mappings}
    mine = _pss("self", lambda a, _p: a in starts)
    cache = sum(_pss(p, lambda _a, path: path.startswith("/memfd:pagein-cache"))
                for p in descendants(server_pid))
    return mine + cache


def _serve(mem_file: str, sock: str, engine: str) -> subprocess.Popen[bytes]:
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                             "--mem-file", mem_file, "--engine", engine,
                             "--ready-fd", str(w)], pass_fds=(w,))
    os.close(w)
    try:
        if not (select.select([r], [], [], 60)[0] and os.read(r, 16)):
            raise SystemExit("pagein serve did not start")
    finally:
        os.close(r)
    return proc


def run_method(directory: str, method: Method, clones: int, want: str, server_pid: int,
               timeout: float) -> Result:
    vms: list[RestoredVm] = []
    times = []
    try:
        for i in range(clones):
            t0 = time.perf_counter()
            vm = restore(directory, method.options)
            vms.append(vm)
            vm.machine.console.send("checksum\n")
            got = vm.machine.console.read_line(timeout)
            times.append(time.perf_counter() - t0)
            if got != want:
                raise SystemExit(f"{method.label}: clone {i} answered {got!r}, not {want!r}")
        host = _host_bytes(vms, server_pid)
    finally:
        for vm in vms:
            vm.close()
    print(f"  {method.label:<22} {host / MiB:8.1f} MiB  clone 1 {times[0]:6.2f} s  "
          f"clone 2 {times[1]:6.2f} s", file=sys.stderr, flush=True)
    return Result(method.label, host, times[0], times[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", type=parse_size, default=256 * MiB, help="guest state (256M)")
    p.add_argument("--clones", type=int, default=8)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 clones of 64 MiB")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    state, clones = (64 * MiB, 4) if args.quick else (args.state, args.clones)
    if clones < 2:
        raise SystemExit("--clones must be at least 2")
    mem = state + 48 * MiB
    ref = FunctionReference(state, 1, args.vcpus)
    want = ref.answer("checksum")
    with tempfile.TemporaryDirectory(prefix="pagein-bench-share-") as d:
        _, _, answers = snapshot_function_guest(d, state, mem, args.vcpus, ("checksum",))
        if answers != (want,):
            raise SystemExit(f"the original guest answered {answers}, the reference {want}")
        sock, py_sock = os.path.join(d, "serve.sock"), os.path.join(d, "python.sock")
        server = _serve(os.path.join(d, "memory"), sock, "native")
        # Shared VMs are served by the python engine: the fair COPY baseline for the cost
        # of a CONTINUE fault is a private restore served by the same engine.
        py_server = _serve(os.path.join(d, "memory"), py_sock, "python")
        try:
            methods = [(Method("uffd", RestoreOptions(uffd_socket=sock)), server),
                       (Method("uffd, python engine", RestoreOptions(uffd_socket=py_sock)),
                        py_server),
                       (Method("uffd --share-pages",
                               RestoreOptions(uffd_socket=sock, share_pages=True)), server),
                       (Method("file", RestoreOptions(backend=Backend.FILE)), server)]
            results = [run_method(d, m, clones, want, srv.pid, args.timeout)
                       for m, srv in methods]
        finally:
            for srv in (server, py_server):
                srv.send_signal(signal.SIGTERM)
                srv.wait(30)
    one = results[0].pss_bytes / clones
    private = results[1]
    rows = [[r.label, str(clones), f"{r.pss_bytes / MiB:.0f}", f"{r.pss_bytes / one:.2f}x",
             f"{r.first_s:.2f}", f"{r.second_s:.2f}", f"{r.second_s / r.first_s:.2f}",
             f"{r.second_s / private.second_s:.2f}"] for r in results]
    print(f"{clones} clones of a {state >> 20} MiB-state function guest, {args.vcpus} vCPU, "
          "every answer equal to the original's")
    print(table(["method", "clones", "host MiB", "x one clone", "clone 1 s", "clone 2 s",
                 "2 / 1", "clone 2 / uffd python"], rows))
    print("targets: --share-pages <= 1.3x one clone; its clone 2 / uffd python <= 1.00 "
          "(CONTINUE vs COPY, same engine); its 2 / 1 < 1 (warm cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
