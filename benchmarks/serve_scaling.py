"""Serve scaling: ``pagein serve`` as users start it, against a minimal C handler.

What it measures. Two servers speak Firecracker's UFFD handler protocol, one after the
other, interleaved over ``--repeat`` runs, driven by the same client, placed the same
way, in the same invocation:

- ``pagein serve --socket S --mem-file F --strategy on-demand`` (or ``populate-all``),
  started as a subprocess exactly as a user starts it (``.venv/bin/pagein``), once per
  engine when ``pagein serve --help`` offers ``--engine`` (``native`` and ``python``),
  else once with its default engine ("default");
- ``benchmarks/c/fc_handler.c``: the handler a user would otherwise write (one thread
  per VM, poll + read 64 messages + one UFFDIO_COPY per fault), the baseline.

Each VM is a ``benchmarks/c/fc_client.c`` process: the project's Firecracker-faithful
client (mmap MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, a uffd with EVENT_REMOVE, every
region registered MISSING, one sendmsg of the JSON regions and the uffd). It touches
25% of the pages one access each and then compares every byte of every touched page
with the memory file; a mismatch aborts the benchmark. Both are compiled with
``gcc -O2 -pthread`` into a temporary directory at start. The memory file (256 MiB,
deterministic content) is written once and kept in the page cache.

Cases (one 4 KiB UFFDIO_COPY per fault):

- one VM, one thread: time per page with server and client on the same CPU
  (``taskset -c 0`` on the server command, client ``--pin 0``), on different CPUs
  (server 0, client 1) and unpinned; the handshake and first page are excluded
  (``first byte`` column), the rest of the touches are timed;
- handler CPU per fault: utime+stime of every thread of the server and of all its
  descendant processes (``/proc/PID/task/*/schedstat``, nanoseconds), sampled after
  every VM's first page and again after the last VM reported, while the VMs are still
  connected, divided by the faults timed;
- scaling: 1, 2, 4, 8 VMs restoring at once on one server (clients released together)
  and 1, 2, 4, 8 faulting threads in one VM, random order, unpinned: aggregate faults/s
  (the 4-VM and 4-thread rows carry the targets);
- bulk: ``--strategy populate-all`` vs ``fc_handler --populate``: from sendmsg until the
  client sees every page present (mincore), then every page is verified; GiB/s.

How to run::

    .venv/bin/python benchmarks/serve_scaling.py            # 256 MiB, 3 runs, ~5 min
    .venv/bin/python benchmarks/serve_scaling.py --quick    # 64 MiB, 1 run
    .venv/bin/python benchmarks/serve_scaling.py --repeat 5 --plot out.png

How to read it. Every table shows the median of the runs for C and for each pagein
engine, the best run, and the ratio pagein/C of the medians: for time per page lower is
better, for faults/s and GiB/s higher is better (each header says which). ``target``
is the ratio to reach and ``ok``/``MISS`` whether the median did. ``spread`` is
(max-min)/median over the runs: this machine is a shared nested VM, and a row whose
spread is larger than its distance to the target says nothing either way. The plot
(``--plot``, default ``serve_scaling.png``) draws the scaling table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _pagecache import warm_cache  # benchmarks/ is on sys.path

from pagein.sys.process import descendants

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAGEIN = ROOT / ".venv" / "bin" / "pagein"
MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096
TIMEOUT = 300.0
SCALE = (1, 2, 4, 8)


# --- the handlers and the client --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handler:
    """One server under test: ``C`` or a pagein engine."""

    label: str
    engine: str | None = None  # pagein --engine value; None: C, or pagein's default

    @property
    def is_c(self) -> bool:
        return self.label == "C"

    def command(self, tools: Tools, sock: str, mem: str, populate: bool) -> list[str]:
        if self.is_c:
            return [str(tools.handler), *(["--populate"] if populate else []), sock, mem]
        strategy = "populate-all" if populate else "on-demand"
        cmd = [str(PAGEIN), "serve", "--socket", sock, "--mem-file", mem, "--strategy", strategy]
        return cmd + (["--engine", self.engine] if self.engine else [])


@dataclass(frozen=True, slots=True)
class Tools:
    client: Path
    handler: Path


def build(out: Path) -> Tools:
    """Compile the C client and reference handler with ``gcc -O2 -pthread`` into ``out``."""
    for name in ("fc_client", "fc_handler"):
        subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-o", str(out / name),
                        str(HERE / "c" / f"{name}.c")], check=True)
    return Tools(out / "fc_client", out / "fc_handler")


def detect_handlers() -> tuple[list[Handler], str]:
    """C first, then each pagein engine ``pagein serve --help`` offers (or its default)."""
    help_text = subprocess.run([str(PAGEIN), "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    if "--engine" in help_text:
        m = re.search(r"--engine \{([\w,-]+)\}", help_text)
        names = m.group(1).split(",") if m else ["native", "python"]
        names.sort(key=lambda n: (n != "native", n != "python", n))
        engines = [Handler(n, n) for n in names]
        note = f"pagein serve offers --engine: {', '.join(names)}"
    else:
        engines = [Handler("default")]
        note = "pagein serve has no --engine flag: its default engine only"
    if "--workers" in help_text:
        note += "; --workers left at its default"
    return [Handler("C"), *engines], note


def write_memory_file(path: Path, size: int, seed: int = 20240611) -> None:
    """Deterministic content: seeded random pages, every 16th page a zero page."""
    rng = random.Random(seed)
    zero = bytes(PAGE)
    with open(path, "wb") as f:
        for off in range(0, size, 16 * MIB):
            chunk = bytearray(rng.randbytes(min(16 * MIB, size - off)))
            for p in range(15, len(chunk) // PAGE, 16):
                chunk[p * PAGE:(p + 1) * PAGE] = zero
            f.write(chunk)
    warm_cache(str(path))


# --- processes -------------------------------------------------------------------------


def tree_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (ns, user+system) of every thread of ``pid`` and of its descendants."""
    times = {}
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    times[int(tid)] = int(f.read().split()[0])
    return times


def cpu_delta_ns(before: dict[int, int], after: dict[int, int]) -> int:
    """Per thread after-before (a thread born in between counts from zero)."""
    return sum(t - before.get(tid, 0) for tid, t in after.items())


@contextlib.contextmanager
def server(cmd: list[str], sock: str, cpu: int | None, log: Path) -> Iterator[int]:
    """Start a server as a user does, wait for its socket, yield its pid, stop it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
    with open(log, "wb") as logf:
        proc = subprocess.Popen(prefix + cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):  # clients retry connect until it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.005)
        yield proc.pid
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} died while serving: {log.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise RuntimeError(f"client {proc.pid} gave no answer within {TIMEOUT:.0f} s")
    return proc.stdout.readline().strip()


def _abort(proc: subprocess.Popen[str], line: str, log: Path) -> None:
    try:
        doc = json.loads(line)
        errors = doc.get("errors", [])
    except ValueError:
        errors = [line or "(no output)"]
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise RuntimeError(f"client {proc.pid} failed: {errors} {err}\nserver log: "
                       f"{log.read_text()[-2000:]}")


@dataclass(slots=True)
class Run:
    """What one case measured against one handler in one run."""

    results: list[dict[str, Any]]  # fc_client's JSON result lines
    cpu_ns: int = 0

    def timed(self) -> int:
        return sum(int(r["timed_pages"]) for r in self.results)

    def span_ns(self) -> int:
        t0 = min(int(r["t0_ns"]) for r in self.results)
        t1 = max(int(r["t1_ns"]) for r in self.results)
        return max(t1 - t0, 1)


def run_clients(tools: Tools, pid: int, log: Path, argv: list[list[str]],
                populated: bool) -> Run:
    """Start one client per argv together, release them together, collect verified results.

    CPU is sampled once every VM has its first page (touch mode; at start for bulk) and
    again after the last result, while every VM is still connected.
    """
    deadline = time.monotonic() + TIMEOUT
    procs = [subprocess.Popen([str(tools.client), *a, "--sync"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argv]
    try:
        before = tree_cpu_ns(pid) if populated else {}
        if not populated:
            for p in procs:
                line = _line(p, deadline)
                if line != "ready":
                    _abort(p, line, log)
            before = tree_cpu_ns(pid)
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
        results = []
        for p in procs:
            line = _line(p, deadline)
            doc = json.loads(line) if line.startswith("{") else {"ok": False, "errors": [line]}
            if not doc.get("ok"):
                _abort(p, line, log)
            results.append(doc)
        cpu = cpu_delta_ns(before, tree_cpu_ns(pid))
    finally:
        for p in procs:
            with contextlib.suppress(BrokenPipeError):
                if p.stdin:
                    p.stdin.close()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return Run(results, cpu)


# --- cases -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One configuration: how many VMs and threads, which order, where things run."""

    key: str
    title: str
    metric: str  # "ns/page", "faults/s" or "GiB/s"
    vms: int = 1
    threads: int = 1
    order: str = "seq"
    server_cpu: int | None = None
    client_cpu: int | None = None
    populate: bool = False
    target: float | None = None  # pagein/C ratio to reach (<= for time, >= for rates)

    def client_argv(self, sock: str, mem: str, fraction: float) -> list[list[str]]:
        out = []
        for vm in range(self.vms):
            a = ["--socket", sock, "--mem-file", mem, "--timeout", str(int(TIMEOUT))]
            if self.populate:
                a.append("--populated")
            else:
                a += ["--threads", str(self.threads), "--fraction", str(fraction),
                      "--order", self.order, "--seed", str(vm + 1)]
            if self.client_cpu is not None:
                a += ["--pin", str(self.client_cpu)]
            out.append(a)
        return out


def all_cases() -> list[Case]:
    cases = [
        Case("same", "one VM, 4 KiB faults, server and client on the same CPU (taskset -c 0, "
             "--pin 0)", "ns/page", server_cpu=0, client_cpu=0, target=1.10),
        Case("diff", "one VM, 4 KiB faults, server on CPU 0, client on CPU 1", "ns/page",
             server_cpu=0, client_cpu=1, target=1.10),
        Case("unpinned", "one VM, 4 KiB faults, unpinned", "ns/page", target=1.10),
    ]
    for n in SCALE:
        cases.append(Case(f"vms{n}", f"{n} VM(s) restoring at once, 1 thread each, random, "
                          "unpinned", "faults/s", vms=n, order="random",
                          target=0.90 if n == 4 else None))
    for n in SCALE[1:]:  # 1 thread in 1 VM is the vms1 case
        cases.append(Case(f"threads{n}", f"one VM, {n} faulting threads, random, unpinned",
                          "faults/s", threads=n, order="random",
                          target=0.90 if n == 4 else None))
    cases.append(Case("bulk", "bulk population: pagein --strategy populate-all vs "
                      "fc_handler --populate, until every page is present", "GiB/s",
                      populate=True, target=0.90))
    return cases


def value(case: Case, run: Run, size: int) -> float:
    """The case's metric for one run."""
    if case.metric == "ns/page":
        return run.span_ns() / run.timed()
    if case.metric == "faults/s":
        return run.timed() / run.span_ns() * 1e9
    return size / GIB / (run.span_ns() / 1e9)


@dataclass(slots=True)
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)

    def add(self, case: Case, handler: Handler, run: Run) -> None:
        self.runs.setdefault((case.key, handler.label), []).append(run)


def measure(cases: Sequence[Case], handlers: Sequence[Handler], tools: Tools, mem: Path,
            work: Path, args: argparse.Namespace) -> Results:
    """Every case, ``repeat`` times, every handler once per repeat (order rotated)."""
    res = Results()
    sock = str(work / "fc.sock")
    for case in cases:
        for rep in range(args.repeat):
            k = rep % len(handlers)
            for h in [*handlers[k:], *handlers[:k]]:
                log = work / f"{case.key}-{h.label}-{rep}.log"
                cmd = h.command(tools, sock, str(mem), case.populate)
                with server(cmd, sock, case.server_cpu, log) as pid:
                    run = run_clients(tools, pid, log, case.client_argv(sock, str(mem),
                                                                       args.fraction),
                                      case.populate)
                res.add(case, h, run)
            print(f"  {case.key:9} run {rep + 1}/{args.repeat} done", file=sys.stderr,
                  flush=True)
    return res


# --- report ----------------------------------------------------------------------------


def _fmt(metric: str, v: float) -> str:
    if metric == "ns/page":
        return f"{v / 1000:8.1f} us"
    if metric == "faults/s":
        return f"{v:9.0f}/s"
    return f"{v:6.2f} GiB/s"


def _ratio(case: Case, v: float, c: float) -> float:
    """pagein/C of the metric as printed: time for ns/page, rate for the others."""
    return v / c


def _meets(case: Case, ratio: float) -> str:
    if case.target is None:
        return ""
    ok = ratio <= case.target if case.metric == "ns/page" else ratio >= case.target
    return "ok" if ok else "MISS"


def table(case: Case, handlers: Sequence[Handler], res: Results, size: int) -> list[str]:
    """One case: median, best, ratio to C, target, spread, CPU per fault, first byte."""
    better = "lower is better" if case.metric == "ns/page" else "higher is better"
    lines = [f"== {case.title}", f"   {case.metric}: {better}; vs C = pagein/C of the medians"]
    lines.append(f"   {'handler':8} {'median':>13} {'best':>13} {'vs C':>6} {'target':>8} "
                 f"{'':4} {'spread':>6} {'CPU/fault':>10} {'first byte':>10}")
    c_med = statistics.median(value(case, r, size) for r in res.runs[(case.key, "C")])
    for h in handlers:
        runs = res.runs[(case.key, h.label)]
        vals = [value(case, r, size) for r in runs]
        med = statistics.median(vals)
        best = min(vals) if case.metric == "ns/page" else max(vals)
        spread = (max(vals) - min(vals)) / med
        if h.is_c:
            ratio_s, target_s, verdict = "", "", ""
        else:
            ratio = _ratio(case, med, c_med)
            ratio_s = f"{ratio:5.2f}x"
            sign = "<=" if case.metric == "ns/page" else ">="
            target_s = f"{sign}{case.target:.2f}x" if case.target else "-"
            verdict = _meets(case, ratio)
        if case.populate:
            cpu_s, first_s = "-", "-"
        else:
            cpu = statistics.median(r.cpu_ns / r.timed() for r in runs)
            first = statistics.median(
                statistics.median(int(x["first_byte_ns"]) for x in r.results)
                for r in runs)
            cpu_s, first_s = f"{cpu / 1000:7.1f} us", f"{first / 1e6:7.2f} ms"
        lines.append(f"   {h.label:8} {_fmt(case.metric, med):>13} {_fmt(case.metric, best):>13} "
                     f"{ratio_s:>6} {target_s:>8} {verdict:4} {spread * 100:5.0f}% "
                     f"{cpu_s:>10} {first_s:>10}")
    return lines


def scaling_table(handlers: Sequence[Handler], res: Results, size: int,
                  cases: dict[str, Case]) -> list[str]:
    """faults/s (median) for 1..8 VMs and 1..8 threads, one column per handler."""
    head = "".join(f"{h.label:>12}" for h in handlers)
    ratios = "".join(f"{h.label + '/C':>10}" for h in handlers if not h.is_c)
    lines = ["== scaling: aggregate faults/s (higher is better), random order, unpinned",
             f"   {'':12}{head}{ratios}"]
    for kind, keys in (("VMs", [f"vms{n}" for n in SCALE]),
                       ("threads", ["vms1", *(f"threads{n}" for n in SCALE[1:])])):
        for n, key in zip(SCALE, keys, strict=True):
            meds = {h.label: statistics.median(value(cases[key], r, size)
                                               for r in res.runs[(key, h.label)])
                    for h in handlers}
            row = "".join(f"{meds[h.label]:12.0f}" for h in handlers)
            row += "".join(f"{meds[h.label] / meds['C']:9.2f}x" for h in handlers if not h.is_c)
            lines.append(f"   {n} {kind:10}{row}")
    return lines


def plot(path: str, handlers: Sequence[Handler], res: Results, size: int,
         cases: dict[str, Case]) -> None:
    """faults/s vs VMs and vs threads, one line per handler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, keys in ((axes[0], "VMs restoring at once", [f"vms{n}" for n in SCALE]),
                           (axes[1], "faulting threads in one VM",
                            ["vms1", *(f"threads{n}" for n in SCALE[1:])])):
        for h in handlers:
            ys = [statistics.median(value(cases[k], r, size) for r in res.runs[(k, h.label)])
                  for k in keys]
            ax.plot(SCALE, ys, marker="o", label="C (fc_handler)" if h.is_c
                    else f"pagein serve ({h.label})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SCALE, [str(n) for n in SCALE])
        ax.set_xlabel(kind)
        ax.set_ylabel("faults/s (higher is better)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("4 KiB on-demand faults, aggregate throughput (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB, one run (unless --repeat)")
    p.add_argument("--size", type=int, default=256 * MIB, help="memory file size in bytes")
    p.add_argument("--repeat", type=int, default=None, help="runs per case (default 3)")
    p.add_argument("--fraction", type=float, default=0.25, help="share of pages touched")
    p.add_argument("--plot", default="serve_scaling.png", help="PNG of the scaling table")
    p.add_argument("--dir", default="/var/tmp", help="where the memory file is written")
    p.add_argument("--only", help="comma-separated case keys (same,diff,unpinned,vms4,...)")
    args = p.parse_args()
    if args.quick:
        args.size = 64 * MIB
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.size % (2 * MIB):
        p.error("--size must be a multiple of 2 MiB")
    if len(os.sched_getaffinity(0)) < 2:
        p.error("needs 2 CPUs to compare same-CPU and cross-CPU placement")
    if not PAGEIN.exists():
        p.error(f"{PAGEIN} not found: run scripts/install.sh")
    handlers, note = detect_handlers()
    cases = all_cases()
    if args.only:
        keep = set(args.only.split(",")) | {"vms1"}
        cases = [c for c in cases if c.key in keep]
    by_key = {c.key: c for c in cases}
    work = Path(tempfile.mkdtemp(prefix="pagein-scaling-"))
    mem = Path(args.dir) / f"pagein-scaling-{os.getpid()}.bin"
    try:
        tools = build(work)
        write_memory_file(mem, args.size)
        t0 = time.monotonic()
        res = measure(cases, handlers, tools, mem, work, args)
        print(f"serve scaling: {args.size // MIB} MiB memory file, {args.fraction:.0%} of "
              f"pages touched per VM, {args.repeat} run(s) each, median; every touched byte "
              f"verified ({time.monotonic() - t0:.0f} s)\n{note}\n")
        for c in cases:
            print("\n".join(table(c, handlers, res, args.size)) + "\n", flush=True)
        if all(k in by_key for k in ("vms1", "vms8", "threads8")):
            print("\n".join(scaling_table(handlers, res, args.size, by_key)))
            plot(args.plot, handlers, res, args.size, by_key)
            print(f"\nplot: {args.plot}")
    finally:
        mem.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
