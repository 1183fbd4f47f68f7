"""Working-set benchmark: REAP/FaaSnap-class restores of the real `function` guest.

Run: ``.venv/bin/python benchmarks/working_set.py`` (256 MiB of state) or ``--quick``
(64 MiB). Needs /dev/kvm. Writes ``--json`` (default ``working_set.json``) for
``pagein report --compare working_set.json --out bars.png``.

One run boots the `function` guest, snapshots it at READY, and then, side by side:

- ``resident``: the original VM answering (no restore: every page already in memory);
- ``copy``: eager restore, the memory file's data read in first;
- ``file warm`` / ``file cold``: the memory file mapped MAP_PRIVATE, with the page cache
  warm, or dropped for that file first (``posix_fadvise(DONTNEED)``);
- ``uffd on-demand`` (4 KiB per fault), ``uffd readahead``, ``uffd populate-all``;
- ``reap``: the recorded working set installed before the first fault is served;
- ``working-set``: pagein's FaaSnap-style prefetch, concurrent with the guest, in
  first-touch order, then readahead.

``--hugepages`` runs another comparison instead: the guest on 2 MiB hugetlb pages
(``pagein vm run --hugepages``, snapshotted at READY), its resident run against
``pagein vm restore --uffd-socket`` of that snapshot on demand (2 MiB per fault) and from
a working set recorded with mix A (in 2 MiB pages), all driven through the CLI as a user
does; each answers mix A after its first answer (``key 0``: the guest is up), unpinned
and pinned (VMM on CPU 0, ``pagein serve`` on CPU 1). The pool is raised by what is
missing and given back after.

``--post-restore`` measures something else: how fast a restored guest runs once its
restore is done, with and without ``pagein serve --collapse`` (huge pages for every
wholly filled 2 MiB range). Each readahead, populate-all and working-set restore answers
a burst (mix A plus a ``checksum`` of all state) once, waits until population and
collapses have settled, then answers it twice more: the best of those is its
post-restore run time (median over ``--repeat`` restores, rows interleaved), printed as
a ratio of the original VM's (resident) run of the
same burst (target <= 1.15x), in wall time and in the VMM's CPU time (the machine is
shared: CPU time is what other jobs disturb least), with the guest RAM's
``AnonHugePages``. A ``copy`` restore (fully resident, fresh memory) is a second
baseline. Run it as is and under ``taskset -c 0`` (the VMM and its handler then share
one CPU).

The working set is recorded once, by an on-demand restore answering request mix A,
before the clock. Every uffd row hands its memory to a ``pagein serve`` started before the
clock (a fleet's daemon: it opens the memory file and loads/verifies the working-set file
then). Each restore answers a burst of requests (sent at once); we time the first answer
and the whole burst from the start of the restore call (resident: from the first
request). A second table uses mix B (other keys and ranges) with the working set of
mix A. Every answer is checked against the numpy reference. The process and its
children are pinned to the same CPUs in every row; each row is repeated and the median
is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from _pagecache import drop_cache, warm_cache  # benchmarks/ is on sys.path
from _vmcli import VmProcess, hugetlb_pages, pinned_to

from pagein.cli._format import parse_size, table
from pagein.serve.strategies import StrategyName
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
HUGE = 2 * MiB
TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    mix: str
    first_answer_ms: float
    burst_ms: float
    faults: int | None
    runs: int


def mix(ref: FunctionReference, seed: int, gets: int, sums: int, span: float) -> list[str]:
    """A request burst: ``gets`` lookups of random keys, ``sums`` range sums of ``span``
    of the records each (a function that reads part of its state)."""
    rng = random.Random(seed)
    out = [f"get {ref.key(rng.randrange(ref.records))}" for _ in range(gets)]
    width = max(1, int(ref.records * span))
    for _ in range(sums):
        a = rng.randrange(ref.records - width)
        out.insert(rng.randrange(len(out) + 1), f"sum {a} {a + width}")
    return out


def burst(send: Callable[[str], None], read: Callable[[float], str], requests: list[str],
          answers: list[str], start: float) -> tuple[float, float]:
    """Send every request, read every answer; return (first, last) seconds from ``start``."""
    for r in requests:
        send(r + "\n")
    first = 0.0
    for i, want in enumerate(answers):
        got = read(TIMEOUT)
        if i == 0:
            first = time.perf_counter() - start
        if got != want:
            raise SystemExit(f"request {requests[i]!r} answered {got!r}, expected {want!r}")
    return first, time.perf_counter() - start


class Handler:
    """A `pagein serve` for one VM, started (and listening) before the clock."""

    def __init__(self, memory: str, workdir: str, *args: str,
                 cpus: list[int] | None = None) -> None:
        self.workdir = tempfile.mkdtemp(prefix="h-", dir=workdir)
        self.sock = os.path.join(self.workdir, "s.sock")
        self.stats = os.path.join(self.workdir, "stats.json")
        r, w = os.pipe()
        self.log = os.path.join(self.workdir, "serve.log")
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*pin, sys.executable, "-m", "pagein", "serve", "--socket", self.sock, "--mem-file",
                 memory, "--exit-after", "1", "--ready-fd", str(w), "--stats-json",
                 self.stats, *args], pass_fds=(w,), stdout=log, stderr=log)
        os.close(w)
        try:
            if not (select.select([r], [], [], 60)[0] and os.read(r, 16)):
                self.proc.kill()
                with open(self.log) as f:
                    raise SystemExit(f"pagein serve {' '.join(args)} did not start: {f.read()}")
        finally:
            os.close(r)

    def finish(self) -> int:
        """Wait for the handler to exit; return its fault count."""
        try:
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        with open(self.stats) as f:
            faults: int = json.load(f)["total"]["faults"]
        shutil.rmtree(self.workdir, ignore_errors=True)
        return faults


def one_restore(snap: str, backend: Backend, requests: list[str], answers: list[str],
                serve: tuple[str, ...] | None, cold: bool) -> tuple[float, float, int | None]:
    memory = os.path.join(snap, "memory")
    if cold:
        drop_cache(memory)
    else:
        warm_cache(memory)
    handler = Handler(memory, snap, *serve) if serve is not None else None
    opts = RestoreOptions(backend=backend, strategy=StrategyName.ON_DEMAND,
                          uffd_socket=handler.sock if handler else None)
    try:
        start = time.perf_counter()
        with restore(snap, opts) as vm:
            first, last = burst(vm.machine.console.send, vm.machine.console.read_line,
                                requests, answers, start)
            vm.machine.console.close_input()
            vm.wait(TIMEOUT)
    finally:
        faults = handler.finish() if handler is not None else None
    return first, last, faults


def boot_and_snapshot(snap: str, state: int, mem: int, resident_mixes: dict[str, list[str]],
                      ref: FunctionReference, repeat: int,
                      then: int = 0) -> dict[str, list[tuple[float, float]]]:
    """Boot, snapshot at READY, then time the original VM answering each mix (``then``:
    after the timed runs, one (wall s, CPU s) entry: the best of ``then`` more)."""
    wa = function_args(state, 1)
    out: dict[str, list[tuple[float, float]]] = {}
    with Machine.create(mem, 1) as m:
        m.pause_on_ready = True
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(TIMEOUT):
            raise SystemExit("the function guest did not become ready")
        m.pause(timeout=60)
        save_snapshot(m, snap, workload=("function", wa.args), digest=False)
        m.resume()
        for name, reqs in resident_mixes.items():
            want = [ref.answer(r) for r in reqs]
            out[name] = [burst(m.console.send, m.console.read_line, reqs, want,
                               time.perf_counter()) for _ in range(repeat)]
            if then:
                out[name] = [timed_bursts(m.console.send, m.console.read_line, reqs, want,
                                          then)]
        m.console.close_input()
        m.wait(TIMEOUT)
    return out


def _settle(vm: RestoredVm) -> None:
    """Wait until the guest's resident pages and huge pages stop changing for 0.3 s."""
    last, since, deadline = (-1, -1), time.perf_counter(), time.perf_counter() + TIMEOUT
    while time.perf_counter() < deadline:
        now = (vm.pages_present(), vm.huge_bytes())
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since > 0.3:
            return
        time.sleep(0.05)  # polling page tables, which have no fd to wait on


def _cpu() -> float:
    """CPU seconds of this process so far (the VMM: its vCPU thread runs the guest)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_bursts(send: Callable[[str], None], read: Callable[[float], str],
                 requests: list[str], answers: list[str], n: int) -> tuple[float, float]:
    """The best of ``n`` bursts: (wall s, VMM CPU s). The best, not the median: the
    machine is shared, and other jobs only ever add time."""
    walls, cpus = [], []
    for _ in range(n):
        c0 = _cpu()
        walls.append(burst(send, read, requests, answers, time.perf_counter())[1])
        cpus.append(_cpu() - c0)
    return min(walls), min(cpus)


def post_restore(snap: str, backend: Backend, serve: tuple[str, ...] | None,
                 requests: list[str], answers: list[str]) -> tuple[float, float, int]:
    """One restore answers once, settles, then: (wall s, CPU s, guest huge-page bytes)."""
    memory = os.path.join(snap, "memory")
    warm_cache(memory)
    handler = Handler(memory, snap, *serve) if serve is not None else None
    try:
        with restore(snap, RestoreOptions(backend=backend, uffd_socket=handler.sock
                                          if handler else None)) as vm:
            c = vm.machine.console
            burst(c.send, c.read_line, requests, answers, time.perf_counter())
            _settle(vm)
            wall, cpu = timed_bursts(c.send, c.read_line, requests, answers, 2)
            huge = vm.huge_bytes()
            c.close_input()
            vm.wait(TIMEOUT)
    finally:
        if handler is not None:
            handler.finish()
    return wall, cpu, huge


def post_restore_main(snap: str, state: int, mem: int, ref: FunctionReference,
                      repeat: int, cpus: list[int], only: str | None = None) -> int:
    """The --post-restore table (see the module docstring)."""
    reqs = [*mix(ref, 11, 200, 4, 0.02), "checksum"]
    want = [ref.answer(r) for r in reqs]
    resident = boot_and_snapshot(snap, state, mem, {"P": reqs}, ref, 1, then=3)["P"]
    ws = os.path.join(snap, "mixA.ws")
    one_restore(snap, Backend.UFFD, reqs[:-1], want[:-1], ("--record", ws), False)
    plan: list[tuple[str, str, Backend, tuple[str, ...] | None]] = [
        ("copy (eager)", "-", Backend.COPY, None)]
    for label, serve in (("readahead", ("--strategy", "readahead")),
                         ("populate-all", ("--strategy", "populate-all")),
                         ("working-set", ("--strategy", "working-set", "--working-set", ws))):
        plan += [(label, flag, Backend.UFFD, (*serve, flag))
                 for flag in ("--collapse", "--no-collapse")]
    if only:
        plan = [p for p in plan if any(k in p[0] for k in only.split(","))]
    runs: dict[int, list[tuple[float, float, int]]] = {i: [] for i in range(len(plan))}
    for _ in range(repeat):  # interleaved: drift on the shared machine hits every row
        for i, (label, flag, backend, serve) in enumerate(plan):
            runs[i].append(post_restore(snap, backend, serve, reqs, want))
            w, c, h = runs[i][-1]
            print(f"  {label:<13} {flag:<14} post-restore {w * 1e3:8.1f} ms, CPU "
                  f"{c * 1e3:8.1f} ms, huge {h >> 20} MiB", file=sys.stderr, flush=True)
    res_w, res_c = resident[0]
    rows = [["resident (no restore)", "-", f"{res_w * 1e3:,.1f}", "1.00x",
             f"{res_c * 1e3:,.1f}", "1.00x", "-"]]
    for i, (label, flag, _b, _s) in enumerate(plan):
        w = statistics.median(r[0] for r in runs[i])
        c = statistics.median(r[1] for r in runs[i])
        h = statistics.median(r[2] for r in runs[i])
        rows.append([label, flag, f"{w * 1e3:,.1f}", f"{w / res_w:.2f}x", f"{c * 1e3:,.1f}",
                     f"{c / res_c:.2f}x", f"{int(h) >> 20}"])
    print(f"\nfunction guest, {state >> 20} MiB of state in {mem >> 20} MiB, 1 vCPU, CPUs "
          f"{cpus}; burst = {len(reqs) - 1} requests of mix A + checksum; each restore "
          "answers it once, settles (population and collapses done), then the best of 2 "
          f"more; median of {repeat} restores per row; resident: the original VM, best of "
          "3 after a first burst\n")
    print(table(["restore", "serve flag", "post-restore ms", "x resident", "VMM CPU ms",
                 "x resident", "huge MiB"], rows))
    return 0


def median_row(label: str, mixname: str, runs: list[tuple[float, float, int | None]]) -> Row:
    faults = [f for _, _, f in runs if f is not None]
    return Row(label, mixname, statistics.median(r[0] for r in runs) * 1e3,
               statistics.median(r[1] for r in runs) * 1e3,
               int(statistics.median(faults)) if faults else None, len(runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB of state, 3 repeats")
    p.add_argument("--state", help="function state size (default 256M; --quick 64M)")
    p.add_argument("--repeat", type=int, help="restores per row (default 5; --quick 3)")
    p.add_argument("--json", default="working_set.json", help="results for pagein report")
    p.add_argument("--workdir", help="where the snapshot is written (default /tmp)")
    p.add_argument("--post-restore", action="store_true",
                   help="time the guest after the restore settled, with and without "
                        "pagein serve --collapse, against the resident run")
    p.add_argument("--only", help="comma-separated substrings: run only matching rows "
                   "(the ratio rows must stay in for the summary)")
    p.add_argument("--hugepages", action="store_true",
                   help="instead: a 2 MiB hugetlb guest (`pagein vm run --hugepages`) "
                        "restored lazily with `pagein vm restore` (on-demand, working-set) "
                        "against its resident run, unpinned and pinned")
    args = p.parse_args()
    state = parse_size(args.state or ("64M" if args.quick else "256M"))
    repeat = args.repeat or (3 if args.quick else 5)
    mem = state * 3 // 2 + 32 * MiB
    if args.hugepages:
        return hugepages_main(state, -(-mem // HUGE) * HUGE, repeat, args.workdir)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)  # handlers and vCPU threads inherit the same set
    ref = FunctionReference(state, 1, 1)
    mixes = {"A": mix(ref, 11, 200, 4, 0.02), "B": mix(ref, 22, 200, 4, 0.02)}
    answers = {k: [ref.answer(r) for r in v] for k, v in mixes.items()}
    if args.post_restore:
        with tempfile.TemporaryDirectory(prefix="pagein-bench-ws-", dir=args.workdir) as snap:
            return post_restore_main(snap, state, mem, ref, repeat, cpus, args.only)
    with tempfile.TemporaryDirectory(prefix="pagein-bench-ws-", dir=args.workdir) as snap:
        t0 = time.perf_counter()
        resident = boot_and_snapshot(snap, state, mem, mixes, ref, repeat)
        print(f"boot + snapshot + resident runs {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        ws = {k: os.path.join(snap, f"mix{k}.ws") for k in mixes}
        for k in mixes:  # record each mix once, on demand, before the clock
            one_restore(snap, Backend.UFFD, mixes[k], answers[k], ("--record", ws[k]), False)
        plan: list[tuple[str, str, Backend, tuple[str, ...] | None, bool]] = [
            ("copy (eager)", "A", Backend.COPY, None, False),
            ("file, warm cache", "A", Backend.FILE, None, False),
            ("file, cold cache", "A", Backend.FILE, None, True),
            ("uffd on-demand 4K", "A", Backend.UFFD, (), False),
            ("uffd readahead", "A", Backend.UFFD, ("--strategy", "readahead"), False),
            ("uffd populate-all", "A", Backend.UFFD, ("--strategy", "populate-all"), False),
            ("REAP-style (blocking)", "A", Backend.UFFD,
             ("--strategy", "reap", "--working-set", ws["A"]), False),
            ("working-set (pagein)", "A", Backend.UFFD,
             ("--strategy", "working-set", "--working-set", ws["A"]), False),
            ("uffd on-demand 4K", "B", Backend.UFFD, (), False),
            ("working-set, recorded B", "B", Backend.UFFD,
             ("--strategy", "working-set", "--working-set", ws["B"]), False),
            ("working-set, recorded A", "B", Backend.UFFD,
             ("--strategy", "working-set", "--working-set", ws["A"]), False),
            ("REAP-style, recorded A", "B", Backend.UFFD,
             ("--strategy", "reap", "--working-set", ws["A"]), False),
        ]
        if args.only:
            keep = args.only.split(",")
            plan = [p for p in plan if any(k in p[0] for k in keep)]
        rows = [Row("resident (no restore)", k, statistics.median(r[0] for r in v) * 1e3,
                    statistics.median(r[1] for r in v) * 1e3, None, len(v))
                for k, v in resident.items()]
        runs: dict[int, list[tuple[float, float, int | None]]] = {i: [] for i in range(len(plan))}
        # Interleave the rows in each repeat so drift on the shared machine hits all alike.
        for _ in range(repeat):
            for i, (label, mixname, backend, serve, cold) in enumerate(plan):
                runs[i].append(one_restore(snap, backend, mixes[mixname], answers[mixname],
                                           serve, cold))
                print(f"  {label:<26} mix {mixname}  burst {runs[i][-1][1] * 1e3:8.1f} ms",
                      file=sys.stderr, flush=True)
        rows += [median_row(label, mixname, runs[i])
                 for i, (label, mixname, *_rest) in enumerate(plan)]
    if not args.only:
        report(rows, state, cpus, repeat, len(mixes["A"]))
    else:
        for r in rows:
            print(f"{r.label:<28} {r.mix}  first {r.first_answer_ms:7.1f}  burst "
                  f"{r.burst_ms:7.1f}  faults {r.faults}")
    with open(args.json, "w") as f:
        json.dump({"benchmark": "working_set", "state_bytes": state, "mem_bytes": mem,
                   "cpus": cpus, "repeat": repeat, "requests": len(mixes["A"]),
                   "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"\nresults: {args.json} (pagein report --compare {args.json} --out bars.png)")
    return 0


# --- --hugepages: a hugetlb guest driven through the CLI -------------------------------

_HUGE_ROWS = ("resident (hugetlb, no restore)", "uffd on-demand (2 MiB faults)",
              "working-set (2 MiB pages)")


def cli_burst(vm: VmProcess, ref: FunctionReference, requests: list[str],
              answers: list[str]) -> tuple[float, float, float]:
    """Wait until the guest answers one lookup (booted, or restored and running), then
    time the burst from its first request, then one ``checksum`` (reads all the state):
    (first answer, whole burst, checksum) in seconds."""
    vm.send("key 0\n")
    if (got := vm.read_line(TIMEOUT)) != ref.answer("key 0"):
        raise SystemExit(f"'key 0' answered {got!r}")
    want = [ref.answer("checksum")]  # the numpy reference takes seconds: not on the clock
    first, whole = burst(vm.send, vm.read_line, requests, answers, time.perf_counter())
    _, checksum = burst(vm.send, vm.read_line, ["checksum"], want, time.perf_counter())
    return first, whole, checksum


Measured = tuple[float, float, float, int | None]  # first, burst, checksum (s); faults


def hugetlb_row(row: str, snap: str, ws: str, mem: int, state: int, ref: FunctionReference,
                requests: list[str], answers: list[str], pinned: bool) -> Measured:
    """One measurement of ``row``: the VMM on CPU 0 and `pagein serve` on CPU 1 when
    ``pinned``, wherever the scheduler puts them otherwise."""
    vmm_cpus, serve_cpus = (pinned_to(0), pinned_to(1)) if pinned else (None, None)
    if row == _HUGE_ROWS[0]:
        return (*_cli_run(["run", "--mem", f"{mem >> 20}M", "--hugepages",
                           f"state={state >> 20}M", "seed=1"], vmm_cpus, ref, requests,
                          answers), None)
    serve = ("--strategy", "working-set", "--working-set", ws) if row == _HUGE_ROWS[2] else ()
    handler = Handler(os.path.join(snap, "memory"), snap, *serve, cpus=serve_cpus)
    try:
        times = _cli_run(["restore", snap, "--uffd-socket", handler.sock], vmm_cpus, ref,
                         requests, answers)
    finally:
        faults = handler.finish()
    return (*times, faults)


def _cli_run(args: list[str], cpus: list[int] | None, ref: FunctionReference,
             requests: list[str], answers: list[str]) -> tuple[float, float, float]:
    vm = VmProcess(args, cpus)
    try:
        times = cli_burst(vm, ref, requests, answers)
        vm.finish(TIMEOUT)
    finally:
        vm.kill()  # only if it is still there: a failed row leaves no guest behind
    return times


def hugepages_main(state: int, mem: int, repeat: int, workdir: str | None) -> int:
    """`pagein vm run --hugepages` resident vs `pagein vm restore` of its snapshot lazily
    (on demand; from a recorded working set), each answering mix A and then a checksum
    after its first answer: run times against the resident run's, unpinned and pinned."""
    ref = FunctionReference(state, 1, 1)
    requests = mix(ref, 11, 200, 4, 0.02)
    answers = [ref.answer(r) for r in requests]
    # A SIGTERM unwinds too: the pool is given back and no guest is left holding pages.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # One guest at a time, plus the spare page a uffd fill can need.
    with hugetlb_pages(mem // HUGE + 1), \
            tempfile.TemporaryDirectory(prefix="pagein-bench-huge-", dir=workdir) as tmp:
        snap, ws = os.path.join(tmp, "snap"), os.path.join(tmp, "working-set")
        VmProcess(["run", "--mem", f"{mem >> 20}M", "--hugepages", "--snapshot-at-ready", snap,
                   f"state={state >> 20}M", "seed=1"]).finish(TIMEOUT)
        handler = Handler(os.path.join(snap, "memory"), tmp, "--record", ws)
        try:  # records mix A and the checksum's pages
            _cli_run(["restore", snap, "--uffd-socket", handler.sock], None, ref, requests,
                     answers)
        finally:
            handler.finish()
        warm_cache(os.path.join(snap, "memory"))
        results: dict[tuple[bool, str], list[Measured]] = {}
        for _ in range(repeat):  # interleaved, so drift on the shared machine hits all rows
            for pinned in (False, True):
                for row in _HUGE_ROWS:
                    # Per row too: another run on this machine may shrink the shared pool.
                    with hugetlb_pages(mem // HUGE + 1):
                        got = hugetlb_row(row, snap, ws, mem, state, ref, requests, answers,
                                          pinned)
                    results.setdefault((pinned, row), []).append(got)
                    print(f"  {'pinned' if pinned else 'unpinned':<8} {row:<32} burst "
                          f"{got[1] * 1e3:8.1f} ms, checksum {got[2] * 1e3:8.1f} ms",
                          file=sys.stderr, flush=True)
    hugepages_report(results, state, mem, len(requests), repeat)
    return 0


def hugepages_report(results: dict[tuple[bool, str], list[Measured]], state: int, mem: int,
                     nreq: int, repeat: int) -> None:
    def med(pinned: bool, row: str, i: int) -> float:
        return statistics.median(float(m[i] or 0) for m in results[(pinned, row)])

    print(f"\nfunction guest on 2 MiB hugetlb pages, {state >> 20} MiB of state in "
          f"{mem >> 20} MiB; after the guest's first answer: a burst of {nreq} requests, "
          f"then a checksum of all state; median of {repeat}; ms; pinned: VMM on CPU 0, "
          "pagein serve on CPU 1\n")
    out = []
    for pinned in (False, True):
        for row in _HUGE_ROWS:
            burst_ms, sum_ms = med(pinned, row, 1) * 1e3, med(pinned, row, 2) * 1e3
            out.append(["pinned" if pinned else "unpinned", row,
                        f"{med(pinned, row, 0) * 1e3:,.1f}", f"{burst_ms:,.1f}",
                        f"{med(pinned, row, 1) / med(pinned, _HUGE_ROWS[0], 1):.2f}x",
                        f"{sum_ms:,.1f}",
                        f"{med(pinned, row, 2) / med(pinned, _HUGE_ROWS[0], 2):.2f}x",
                        "-" if row == _HUGE_ROWS[0] else str(int(med(pinned, row, 3)))])
    print(table(["cpus", "run", "first answer", "burst", "vs resident", "checksum",
                 "vs resident", "faults"], out))
    print("\ntarget: a lazily restored hugetlb guest within 1.15x of its resident run")


def _find(rows: list[Row], label: str, mixname: str) -> Row:
    return next(r for r in rows if r.label == label and r.mix == mixname)


def report(rows: list[Row], state: int, cpus: list[int], repeat: int, nreq: int) -> None:
    print(f"\nfunction guest, {state >> 20} MiB of state, 1 vCPU, pinned to CPUs {cpus}; "
          f"a burst of {nreq} requests; median of {repeat}; ms from the start of the restore "
          "(resident: from the first request)\n")
    for mixname in ("A", "B"):
        base = _find(rows, "uffd on-demand 4K", mixname)
        out = []
        for r in (r for r in rows if r.mix == mixname):
            out.append([r.label, f"{r.first_answer_ms:,.1f}", f"{r.burst_ms:,.1f}",
                        f"{base.burst_ms / r.burst_ms:,.2f}x",
                        "-" if r.faults is None else str(r.faults)])
        print(f"mix {mixname}" + (" (working sets recorded with mix A or B)"
                                  if mixname == "B" else " (the working set's own mix)"))
        print(table(["restore", "first answer", "burst", "vs on-demand", "faults"], out))
        print()
    ws, od = _find(rows, "working-set (pagein)", "A"), _find(rows, "uffd on-demand 4K", "A")
    res, cold = _find(rows, "resident (no restore)", "A"), _find(rows, "file, cold cache", "A")
    reap = _find(rows, "REAP-style (blocking)", "A")
    cross = _find(rows, "working-set, recorded A", "B")
    od_b = _find(rows, "uffd on-demand 4K", "B")
    own_b = _find(rows, "working-set, recorded B", "B")
    print(f"working-set vs 4 KiB on-demand: {od.burst_ms / ws.burst_ms:.2f}x faster "
          "(target >= 3.7x)")
    print(f"working-set vs fully resident:  {ws.burst_ms / res.burst_ms:.2f}x the time "
          "(target <= 1.15x)")
    print(f"working-set vs file, cold cache: {cold.burst_ms / ws.burst_ms:.2f}x faster "
          "(target > 1x)")
    print(f"working-set vs REAP-style:      {reap.burst_ms / ws.burst_ms:.2f}x faster")
    print(f"mix B with mix A's working set: {od_b.burst_ms / cross.burst_ms:.2f}x faster than "
          f"on-demand ({od_b.burst_ms / own_b.burst_ms:.2f}x with its own)")


if __name__ == "__main__":
    sys.exit(main())
