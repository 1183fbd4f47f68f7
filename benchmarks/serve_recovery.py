"""What a serving worker's crash costs a restore: ``pagein serve`` with its workers
SIGKILLed while a VM restores, against the same restore without crashes and against a
minimal C handler (which cannot survive a crash at all), in the same run.

What it measures. Each run restores one VM (``benchmarks/c/fc_client.c``, the project's
Firecracker-faithful client: 2 threads, random order, every page of 256 MiB touched once
and then compared with the memory file; a mismatch aborts the benchmark) from:

- ``C``: ``benchmarks/c/fc_handler.c`` (one thread per VM, poll + read + UFFDIO_COPY);
- ``pagein``: ``pagein serve --workers 1`` started as a user starts it, no crash;
- ``pagein+kills``: the same, with its serving worker (the ``pagein-worker0`` child)
  SIGKILLed every ``--interval`` ms during the restore. The supervisor replaces it (a
  spare worker when one is ready, else one forked by the zygote) and the VM goes on.

The restore time is the client's own span (first to last touch, CLOCK_MONOTONIC). The
extra time per crash is (median pagein+kills - median pagein) / kills in the span; the
stats file adds the time the VM spent without a worker (``ms_without_worker``), which is
what the guest waited, per kill. Ratios are to C in the same run (the machine is a shared
nested VM: absolute numbers move from run to run, ratios less).

Placement: ``--cpus none`` (default) runs everything unpinned; ``--cpus split`` pins the
server (all of its processes, ``taskset`` before it starts) to CPU 0 and the client to
CPU 1, for C and pagein alike.

How to run::

    .venv/bin/python benchmarks/serve_recovery.py                   # 256 MiB, 3 runs
    .venv/bin/python benchmarks/serve_recovery.py --interval 100    # back-to-back crashes
    .venv/bin/python benchmarks/serve_recovery.py --cpus split --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_scaling import MIB, PAGEIN, Handler, Tools, build, run_clients, server, write_memory_file

from pagein.sys.process import live_children_named

CLIENT_CPU = {"none": None, "split": 1}
SERVER_CPU = {"none": None, "split": 0}


def serving_workers(server_pid: int) -> set[int]:
    """The server's live children named ``pagein-worker<N>``."""
    return live_children_named(server_pid, "pagein-worker")


class Killer:
    """SIGKILL the server's serving worker every ``interval`` s; remember when."""

    def __init__(self, server_pid: int, interval: float) -> None:
        self.server_pid = server_pid
        self.interval = interval
        self.kills_ns: list[int] = []
        self._killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in serving_workers(self.server_pid):
                if pid in self._killed:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self._killed.add(pid)
                    self.kills_ns.append(time.monotonic_ns())
                break  # one worker per interval

    def kills_between(self, t0_ns: int, t1_ns: int) -> int:
        return sum(1 for t in self.kills_ns if t0_ns <= t <= t1_ns)


@dataclass(slots=True)
class Sample:
    span_ms: float
    kills: int = 0
    ms_without_worker: float = 0.0


@dataclass(slots=True)
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, label: str, s: Sample) -> None:
        self.samples.setdefault(label, []).append(s)

    def median(self, label: str) -> float:
        return statistics.median(s.span_ms for s in self.samples[label])


def one_run(label: str, tools: Tools, mem: Path, tmp: Path, args: argparse.Namespace) -> Sample:
    sock = str(tmp / f"{label}.sock")
    log = tmp / f"{label}.log"
    stats = tmp / f"{label}.stats.json"
    with contextlib.suppress(FileNotFoundError):
        stats.unlink()
    if label == "C":
        cmd = Handler("C").command(tools, sock, str(mem), False)
    else:
        cmd = [str(PAGEIN), "serve", "--socket", sock, "--mem-file", str(mem), "--workers",
               "1", "--max-restarts", "1000000", "--stats-json", str(stats)]
    client = ["--socket", sock, "--mem-file", str(mem), "--threads", "2", "--order",
              "random", "--fraction", "1", "--timeout", "600"]
    cpu = CLIENT_CPU[args.cpus]
    if cpu is not None:
        client += ["--pin", str(cpu)]
    with server(cmd, sock, SERVER_CPU[args.cpus], log) as pid:
        killer = Killer(pid, args.interval / 1000)
        with killer if label == "pagein+kills" else contextlib.nullcontext():
            run = run_clients(tools, pid, log, [client], populated=False)
    (res,) = run.results
    t0, t1 = int(res["t0_ns"]), int(res["t1_ns"])
    sample = Sample((t1 - t0) / 1e6, killer.kills_between(t0, t1))
    if label != "C":
        deadline = time.monotonic() + 10
        while not stats.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        vms = json.loads(stats.read_text())["vms"]
        sample.ms_without_worker = float(vms[0]["ms_without_worker"])
    return sample


def report(res: Results, args: argparse.Namespace) -> None:
    c = res.median("C")
    base = res.median("pagein")
    kill = res.median("pagein+kills")
    kills = statistics.median(s.kills for s in res.samples["pagein+kills"])
    waited = statistics.median(s.ms_without_worker / max(1, s.kills)
                               for s in res.samples["pagein+kills"])
    print(f"\n{args.size_mib} MiB, 2 threads, random order, {args.repeat} run(s), "
          f"CPUs: {args.cpus}, a kill every {args.interval:g} ms\n")
    print(f"{'handler':<14} {'restore ms':>11} {'best':>9} {'ratio to C':>11} {'kills':>6}")
    for label in ("C", "pagein", "pagein+kills"):
        med = res.median(label)
        best = min(s.span_ms for s in res.samples[label])
        k = statistics.median(s.kills for s in res.samples[label])
        print(f"{label:<14} {med:>11.1f} {best:>9.1f} {med / c:>10.2f}x "
              f"{k:>6.0f}")
    per = (kill - base) / kills if kills else float("nan")
    print(f"\nextra restore time per crash: {per:.1f} ms "
          f"(= ({kill:.0f} - {base:.0f}) ms / {kills:.0f} kills)")
    print(f"time the VM waited without a worker, per crash: {waited:.1f} ms "
          "(the server's ms_without_worker / kills)")
    print(f"fault path without crashes: pagein {base / c:.2f}x C's restore time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--interval", type=float, default=250.0,
                   help="ms between two kills (default 250: a spare worker is ready)")
    p.add_argument("--cpus", choices=sorted(CLIENT_CPU), default="none")
    p.add_argument("--quick", action="store_true", help="64 MiB, one run")
    args = p.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 64, 1
    if not PAGEIN.exists():
        print(f"no {PAGEIN}: run scripts/install.sh first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pagein-recovery-") as d:
        tmp = Path(d)
        tools = build(tmp)
        mem = tmp / "mem.snap"
        write_memory_file(mem, args.size_mib * MIB)
        res = Results()
        labels = ["C", "pagein", "pagein+kills"]
        for r in range(args.repeat):
            for label in labels[r % 3:] + labels[:r % 3]:  # rotate the order
                s = one_run(label, tools, mem, tmp, args)
                res.add(label, s)
                print(f"run {r + 1}/{args.repeat} {label:<13} {s.span_ms:8.1f} ms "
                      f"{s.kills:4d} kills", flush=True)
        report(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
