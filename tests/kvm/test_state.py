"""vCPU state and pausing: what a snapshot/restore builds on.

The restore test is the whole loop in miniature: run `function` to ready, pause, copy
guest memory and every vCPU's state, then start a second VM on caller-supplied memory
holding that copy, with the saved vCPU states, and check it answers like the reference.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from _guest import function_at_ready

from pagein.sys.kvm import Regs
from pagein.sys.mapping import Mapping
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.memory import GuestMemory, Region
from pagein.vmm.reference import FunctionReference
from pagein.vmm.workloads import Fault, hello_args

MiB = 1 << 20


def test_state_round_trips_through_kvm() -> None:
    with Machine.create(32 * MiB, 2) as m:
        m.boot(workload_image("hello"), hello_args(0).args)
        before = m.vcpu_states()
        assert [s.regs.rdi for s in before] == [0, 1]
        assert before[0].sregs.cs.dpl == 3 and len(before[0].xsave) >= 4096
        msr_ids = {i for i, _ in before[0].msrs}
        assert {0x10, 0xC0000102} <= msr_ids  # TSC and kernel GS base are saved
        changed = replace(before[1], regs=replace(before[1].regs, rax=0x1234, r15=7))
        m.vcpus[1].set_state(changed)
        after = m.vcpu_states()[1]
        assert after.regs == Regs(**{**_fields(before[1].regs), "rax": 0x1234, "r15": 7})
        assert after.sregs == before[1].sregs
        assert after.xsave == before[1].xsave and after.xcrs == before[1].xcrs


def _fields(regs: Regs) -> dict[str, int]:
    return {name: getattr(regs, name) for name in Regs.__dataclass_fields__}


def test_pause_kicks_a_spinning_vcpu_and_resume_continues() -> None:
    with Machine.create(32 * MiB, 2) as m:
        m.boot(workload_image("hello"), hello_args(0, Fault.SPIN).args)
        m.start()
        lines = [m.console.read_line(timeout=30) for _ in range(3)]
        assert lines == ["hello from vcpu 0", "hello from vcpu 1", "spinning"]
        m.pause(timeout=30)  # vCPU 0 never exits on its own: only the kick stops it
        assert m.result().exits["Interrupted"] >= 1
        first = m.vcpu_states()[0].regs.rip
        m.resume()
        m.pause(timeout=30)
        assert abs(m.vcpu_states()[0].regs.rip - first) < 16  # still in its loop
        m.resume()
        m.stop()
        assert m.wait(timeout=30).status == 0


def test_restore_from_copied_memory_and_states_answers_the_same() -> None:
    state, seed, mem = 16 * MiB, 3, 48 * MiB
    ref = FunctionReference(state, seed)
    states, image = function_at_ready(state, seed, mem)
    with Mapping.anonymous(mem) as mapping:
        mapping.write(0, image)
        memory = GuestMemory.from_mappings([Region(0, mapping)])
        with Machine(memory, 2) as restored:
            restored.set_vcpu_states(states)
            restored.start()
            for request in ("checksum", f"get {ref.key(77)}", "sum 3 9999"):
                restored.console.send(request + "\n")
                assert restored.console.read_line(timeout=60) == ref.answer(request)
            restored.console.close_input()
            assert restored.wait(timeout=60).status == 0
        assert not mapping.closed  # caller-supplied memory stays the caller's


def test_start_runs_only_the_given_vcpus() -> None:
    with Machine.create(32 * MiB, 3) as m:
        m.boot(workload_image("hello"), hello_args(4).args)
        with pytest.raises(ValueError, match=r"vCPU ids \[5\] must be a non-empty subset"):
            m.start({5})
        m.start({0, 2})
        assert m.active_vcpus <= {0, 2}
        assert m.wait(timeout=30).status == 4
        assert m.console.output() == b"hello from vcpu 0\nhello from vcpu 2\n"
