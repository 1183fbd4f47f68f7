"""The `scan` workload gives the reference checksum in every pattern, read and write."""

from __future__ import annotations

import pytest

from pagein.vmm.image import workload_image
from pagein.vmm.layout import HEAP_START
from pagein.vmm.machine import Machine
from pagein.vmm.reference import scan_line
from pagein.vmm.workloads import Op, Pattern, WorkloadArgs, scan_args

MiB = 1 << 20
MEM = 48 * MiB


def _run(wa: WorkloadArgs, vcpus: int) -> str:
    with Machine.create(MEM, vcpus) as m:
        m.boot(workload_image("scan"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        result = m.wait(timeout=60)
        assert result.status == 0
        assert result.exits["IoOut:READY"] == 1
        return m.console.output().decode().strip()


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name.lower())
@pytest.mark.parametrize("pattern", list(Pattern), ids=lambda p: p.name.lower())
def test_scan_pattern_matches_reference(pattern: Pattern, op: Op) -> None:
    wa = scan_args(pattern, op, stride_pages=7, hot_percent=3, seed=11)
    assert _run(wa, 1) == scan_line(wa.args, MEM - HEAP_START)


@pytest.mark.parametrize(("pattern", "touches"), [(Pattern.SEQUENTIAL, 3 * 2048),
                                                  (Pattern.RANDOM, 20000),
                                                  (Pattern.HOTSET, 9000)])
def test_scan_writes_read_back_on_four_vcpus(pattern: Pattern, touches: int) -> None:
    # Over several passes a write is read back by a later touch of the same word, so the
    # checksum proves the stores landed; four vCPUs must agree with one.
    wa = scan_args(pattern, Op.WRITE, size_bytes=8 * MiB, touches=touches, seed=3)
    expected = scan_line(wa.args, MEM - HEAP_START)
    assert _run(wa, 4) == expected
    read = scan_args(pattern, Op.READ, size_bytes=8 * MiB, touches=touches, seed=3)
    assert scan_line(read.args, MEM - HEAP_START) != expected
