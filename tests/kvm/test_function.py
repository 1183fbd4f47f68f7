"""The `function` workload on 1 and 4 vCPUs reaches ready and answers like the reference."""

from __future__ import annotations

import pytest

from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.workloads import function_args

MiB = 1 << 20
STATE = 64 * MiB
SEED = 7


@pytest.fixture(scope="module")
def reference() -> FunctionReference:
    return FunctionReference(STATE, SEED)


@pytest.mark.parametrize("vcpus", [1, 4])
def test_function_answers_match_reference(vcpus: int, reference: FunctionReference) -> None:
    wa = function_args(STATE, SEED)
    with Machine.create(96 * MiB, vcpus) as m:
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.ready.wait(60), "the guest never signalled ready"
        requests = [
            "key 0", f"key {reference.records - 1}", f"key {reference.records}",
            f"get {reference.key(4242)}", f"get {reference.key(reference.records - 1)}",
            "get 12345", "sum 0 10", "sum 1000 900000", f"sum 5 {reference.records * 2}",
            "checksum", "frobnicate", "checksum",
        ]
        for request in requests:
            m.console.send(request + "\n")
            assert m.console.read_line(timeout=60) == reference.answer(request), request
        m.console.send("info\n")
        assert m.console.read_line(timeout=60) == (
            f"records {reference.records} table {reference.capacity} vcpus {vcpus}")
        m.console.send("quit\n")
        result = m.wait(timeout=60)
    assert result.status == 0
    assert result.exits["IoOut:READY"] == 1
    assert result.exits["IoOut:READ"] == len(requests) + 2


def test_end_of_input_ends_the_function() -> None:
    wa = function_args(MiB, 1)
    with Machine.create(32 * MiB, 2) as m:
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        m.console.send("sum 0 3")  # no newline: delivered at end of input
        m.console.close_input()
        assert m.wait(timeout=60).status == 0
        assert m.console.read_line(timeout=1) == FunctionReference(MiB, 1).answer("sum 0 3")


@pytest.mark.parametrize("vcpus", [1, 3])
def test_update_rewrites_payloads_like_the_reference(vcpus: int) -> None:
    """`update A B S` changes later answers (sum, get, checksum) exactly as the reference."""
    ref = FunctionReference(8 * MiB, SEED)
    wa = function_args(8 * MiB, SEED)
    with Machine.create(48 * MiB, vcpus) as m:
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.ready.wait(60)
        before = ref.answer("checksum")
        requests = ["update 10 5000 3", "sum 0 6000", f"get {ref.key(11)}", "checksum",
                    f"update 4000 {ref.records + 9} 99", "sum 3990 4010", "checksum",
                    "update 7 7 1"]
        for request in requests:
            m.console.send(request + "\n")
            assert m.console.read_line(timeout=60) == ref.answer(request), request
        assert ref.answer("checksum") != before
        m.console.send("quit\n")
        assert m.wait(timeout=60).status == 0
