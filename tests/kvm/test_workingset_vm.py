"""Record the working set of a restored `function` guest on the real /dev/kvm and
prefetch it at the next restores: answers equal the original guest's, fewer faults."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _guest import park_function_at_ready

from pagein.serve.cause import Cause
from pagein.serve.record import load_trace
from pagein.serve.strategies import StrategyName
from pagein.snapshot import workingset
from pagein.snapshot.raw import RawFileSource
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
STATE, MEM, SEED = 8 * MiB, 32 * MiB, 3
TIMEOUT = 60.0
PAGE = 4096


@dataclass(frozen=True)
class Snap:
    directory: str
    ref: FunctionReference

    @property
    def memory(self) -> str:
        return os.path.join(self.directory, "memory")


@pytest.fixture(scope="module")
def snap() -> Iterator[Snap]:
    wa = function_args(STATE, SEED)
    with tempfile.TemporaryDirectory(prefix="pagein-test-ws-") as d:
        with Machine.create(MEM, 1) as m:
            park_function_at_ready(m, wa, timeout=TIMEOUT)
            save_snapshot(m, d, workload=("function", wa.args))
            m.console.close_input()
            m.resume()
            assert m.wait(TIMEOUT).status == 0
        yield Snap(d, FunctionReference(STATE, SEED, 1))


def _mix_a(ref: FunctionReference) -> tuple[str, ...]:
    gets = [f"get {ref.key(i)}" for i in range(0, ref.records, ref.records // 40)]
    return (*gets, "sum 0 30000")


def _mix_b(ref: FunctionReference) -> tuple[str, ...]:
    return (f"get {ref.key(7)}", "sum 50000 90000", "checksum", f"key {ref.records - 3}")


def _restore(snap: Snap, tmp: Path, requests: tuple[str, ...], *serve: str) -> dict[str, int]:
    """Restore through a `pagein serve` started with ``serve``; check every answer."""
    tmp.mkdir(exist_ok=True)
    sock, stats = str(tmp / "s.sock"), str(tmp / "stats.json")
    r, w = os.pipe()
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pagein", "-v", "serve", "--socket", sock,
                                 "--mem-file", snap.memory, "--ready-fd", str(w),
                                 "--exit-after", "1", "--stats-json", stats, *serve],
                                pass_fds=(w,), stdout=log, stderr=log)
    os.close(w)
    try:
        ready = select.select([r], [], [], TIMEOUT)[0] and os.read(r, 16)
        assert ready, (tmp / "serve.log").read_text()
        with restore(snap.directory, RestoreOptions(backend=Backend.UFFD,
                                                    strategy=StrategyName.ON_DEMAND,
                                                    uffd_socket=sock)) as vm:
            for q in requests:
                vm.machine.console.send(q + "\n")
                assert vm.machine.console.read_line(TIMEOUT) == snap.ref.answer(q), q
            vm.machine.console.close_input()
            assert vm.wait(TIMEOUT).status == 0
        assert proc.wait(TIMEOUT) == 0
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(stats) as f:
        total: dict[str, int] = json.load(f)["total"]
    return total


def test_record_then_prefetch_the_working_set_on_the_real_guest(snap: Snap,
                                                                 tmp_path: Path) -> None:
    ws_path = str(tmp_path / "a.ws")
    rec = _restore(snap, tmp_path / "rec", _mix_a(snap.ref), "--record", ws_path)
    trace = load_trace(ws_path + ".trace.json")
    assert len(trace.faults) == rec["faults"] > 0
    # The VMM negotiated UFFD_FEATURE_THREAD_ID: each fault names a thread of the VMM.
    assert {f.thread_id for f in trace.faults} and all(f.thread_id > 0 for f in trace.faults)
    first: list[int] = []
    for f in trace.faults:
        if f.offset not in first:
            first.append(f.offset)
    with open(snap.memory, "rb") as f:
        memory = f.read()
    with RawFileSource(snap.memory) as src, workingset.load(ws_path, src) as ws:
        stored = [r.offset + i * PAGE for r in ws.runs for i in range(r.pages)]
        merged = workingset.merge_runs(first)  # first-touch order of the stream-merged runs
        assert stored == [o + i * PAGE for o, n in merged for i in range(n)]
        assert sorted(stored) == sorted(first)
        for r in ws.runs:
            for i in range(r.pages):
                off = r.offset + i * PAGE
                if r.kind is workingset.RunKind.DATA:
                    assert ws.page_bytes(r, i) == memory[off:off + PAGE]
                else:
                    assert not any(memory[off:off + PAGE])

    # Same mix, prefetched concurrently and blocking: far fewer faults, same answers.
    trace_path = str(tmp_path / "ws.trace.json")
    got = _restore(snap, tmp_path / "ws", _mix_a(snap.ref), "--strategy", "working-set",
                   "--working-set", ws_path, "--then", "on-demand", "--trace", trace_path)
    assert got["faults"] * 2 < rec["faults"], (got["faults"], rec["faults"])
    assert Cause.PREFETCH in {f.cause for f in load_trace(trace_path).fills}
    reap = _restore(snap, tmp_path / "reap", _mix_a(snap.ref), "--strategy", "reap",
                    "--working-set", ws_path)
    assert reap["faults"] * 2 < rec["faults"], (reap["faults"], rec["faults"])

    # Another mix with the working set of the first: still every answer right.
    _restore(snap, tmp_path / "mixb", _mix_b(snap.ref), "--strategy", "working-set",
             "--working-set", ws_path, "--then", "populate-all")
