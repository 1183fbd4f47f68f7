"""Diff vs full snapshot of a running `function` guest, and the cost of dirty tracking.

Run: ``.venv/bin/python benchmarks/vm_diff.py [STATE_MIB]`` (default 256). Prints, in one
run on this machine: the guest's time for a fixed burst of 20 `update` requests over all
records with dirty tracking off and on (the ratio), and for a 1% `update` the pause and
the bytes written by a full snapshot and by a diff (the ratios). Not yet here: the
100-layer chain's per-fault cost against its squashed snapshot (issue 16).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
BURST = 20


def _ask(m: Machine, request: str) -> None:
    m.console.send(request + "\n")
    if m.console.read_line(300) is None:
        raise RuntimeError(f"no answer to {request!r}")


def run(state: int, track: bool) -> dict[str, float]:
    """One guest: the burst's time, and with tracking the full and diff snapshots."""
    wa = function_args(state, 1)
    records = state // 64
    out: dict[str, float] = {}
    with Machine.create(state + 48 * MiB, 2) as m:
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


def main() -> None:
    state = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 256 * MiB
    off, on = run(state, False), run(state, True)
    print(f"burst of {BURST} updates: tracking off {off['burst_s']:.3f} s, on "
          f"{on['burst_s']:.3f} s ({on['burst_s'] / off['burst_s']:.2f}x)")
    print(f"full snapshot: pause {on['full_pause_ms']:.1f} ms, {on['full_bytes']:.0f} bytes")
    print(f"diff (1% updated): pause {on['diff_pause_ms']:.1f} ms "
          f"({on['diff_pause_ms'] / on['full_pause_ms']:.1%}), {on['diff_bytes']:.0f} bytes "
          f"({on['diff_bytes'] / on['full_bytes']:.2%})")


if __name__ == "__main__":
    main()
