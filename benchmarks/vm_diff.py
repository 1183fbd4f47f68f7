"""Diff vs full snapshot of a running `function` guest, and the cost of dirty tracking.

Run: ``.venv/bin/python benchmarks/vm_diff.py [STATE_MIB]`` (default 256). Prints, in one
run on this machine: the guest's time for a fixed burst of 20 `update` requests over all
records with dirty tracking off and on (the ratio), and for a 1% `update` the pause and
the bytes written by a full snapshot and by a diff (the ratios); then a chain of
``DEPTH`` diffs (each after a 1% `update` at a random place): the time to open it at
depth 1, 10 and ``DEPTH`` (resolve and check every link, read the top layer's index,
map its runs; best of five), and the guest's first `checksum` (which faults in every
page) after a uffd restore of the chain's top against the same after a restore of the
squashed snapshot, best of three each, interleaved.

The burst is pagein's figure for what dirty tracking costs a running guest (KVM's
dirty log, the tracker pagein uses); benchmarks/dirty_trackers.py is a probe of the
two kernel mechanisms outside pagein.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time

from pagein.snapshot.chain import ChainSource
from pagein.vmm.image import workload_image
from pagein.vmm.layers import squash
from pagein.vmm.machine import Machine
from pagein.vmm.restore import Backend, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
BURST = 20
DEPTH = 100


def _mem(heap: int) -> int:
    """Guest RAM for a workload heap: the layout's 32 MiB below it, rounded to 2 MiB."""
    return -(-(heap + 48 * MiB) // (2 * MiB)) * 2 * MiB


def _ask(m: Machine, request: str) -> None:
    m.console.send(request + "\n")
    if m.console.read_line(300) is None:
        raise RuntimeError(f"no answer to {request!r}")


def run(state: int, track: bool) -> dict[str, float]:
    """One guest: the burst's time, and with tracking the full and diff snapshots."""
    wa = function_args(state, 1)
    records = state // 64
    out: dict[str, float] = {}
    with Machine.create(_mem(wa.min_heap_bytes), 2) as m:
        if track:
            m.enable_dirty_tracking()
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(300):
            raise RuntimeError("the guest never said READY")
        t = time.perf_counter()
        for i in range(BURST):
            _ask(m, f"update 0 {records} {i}")
        out["burst_s"] = time.perf_counter() - t
        if track:
            d = tempfile.mkdtemp(prefix="pagein-bench-diff-", dir="/var/tmp")
            try:
                for name, diff in (("full", False), ("diff", True)):
                    if diff:
                        _ask(m, f"update 0 {records // 100} 77")
                    m.pause(60)
                    t = time.perf_counter()
                    snap = save_snapshot(m, f"{d}/{name}", diff=diff)
                    out[f"{name}_pause_ms"] = (time.perf_counter() - t) * 1e3
                    out[f"{name}_bytes"] = snap.bytes_written
                    m.resume()
            finally:
                shutil.rmtree(d, ignore_errors=True)
        m.console.close_input()
        m.wait(60)
    return out


def build_chain(state: int, root: str) -> str:
    """A full snapshot and DEPTH diffs on it; return the top layer's directory."""
    wa = function_args(state, 1)
    records = state // 64
    rng = random.Random(16)
    with Machine.create(_mem(wa.min_heap_bytes), 2) as m:
        m.enable_dirty_tracking()
        m.pause_on_ready = True
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(300):
            raise RuntimeError("the guest never said READY")
        m.pause(60)
        save_snapshot(m, f"{root}/l0", workload=("function", wa.args))
        for i in range(1, DEPTH + 1):
            m.resume()
            a = rng.randrange(records - records // 100)
            _ask(m, f"update {a} {a + records // 100} {i}")
            m.pause(60)
            save_snapshot(m, f"{root}/l{i}", diff=True)
        m.resume()
    return f"{root}/l{DEPTH}"


def first_checksum(directory: str) -> float:
    with restore(directory, RestoreOptions(backend=Backend.UFFD, track_dirty=False)) as vm:
        t = time.perf_counter()
        _ask(vm.machine, "checksum")
        return time.perf_counter() - t


def chain_bench(state: int) -> None:
    root = tempfile.mkdtemp(prefix="pagein-bench-chain-", dir="/var/tmp")
    try:
        top = build_chain(state, root)
        for depth in (1, 10, DEPTH):
            best, runs = float("inf"), 0
            for _ in range(5):
                t = time.perf_counter()
                with ChainSource(f"{root}/l{depth}") as src:
                    best = min(best, time.perf_counter() - t)
                    runs = len(src.chain.runs())
            print(f"chain of {depth} diffs: opened in {best * 1e3:.1f} ms ({runs} runs mapped)")
        squash(top, f"{root}/squashed")
        chain_s, flat_s = [], []
        for _ in range(3):
            chain_s.append(first_checksum(top))
            flat_s.append(first_checksum(f"{root}/squashed"))
        print(f"chain of {DEPTH} diffs: "
              f"first checksum after uffd restore {min(chain_s) * 1e3:.1f} ms vs squashed "
              f"{min(flat_s) * 1e3:.1f} ms ({min(chain_s) / min(flat_s):.3f}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_mib", nargs="?", type=int, default=256,
                   help="the function guest's state in MiB (default 256)")
    p.add_argument("--chain-only", action="store_true",
                   help="only the chain figures (open times, first checksum vs squashed)")
    args = p.parse_args()
    state = args.state_mib * MiB
    chain_bench(state)
    if args.chain_only:
        return
    off, on = run(state, False), run(state, True)
    print(f"burst of {BURST} updates: tracking off {off['burst_s']:.3f} s, on "
          f"{on['burst_s']:.3f} s ({on['burst_s'] / off['burst_s']:.2f}x)")
    print(f"full snapshot: pause {on['full_pause_ms']:.1f} ms, {on['full_bytes']:.0f} bytes")
    print(f"diff (1% updated): pause {on['diff_pause_ms']:.1f} ms "
          f"({on['diff_pause_ms'] / on['full_pause_ms']:.1%}), {on['diff_bytes']:.0f} bytes "
          f"({on['diff_bytes'] / on['full_bytes']:.2%})")


if __name__ == "__main__":
    main()
