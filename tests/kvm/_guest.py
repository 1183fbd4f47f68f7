"""Helpers shared by the KVM tests."""

from __future__ import annotations

from pagein.sys.kvm import VcpuState
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.workloads import function_args


def function_at_ready(state: int, seed: int, mem: int,
                      vcpus: int = 2) -> tuple[list[VcpuState], bytes]:
    """Boot ``function``, park it at READY, return its vCPU states and a copy of its RAM."""
    wa = function_args(state, seed)
    with Machine.create(mem, vcpus) as m:
        m.pause_on_ready = True
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.ready.wait(60)
        m.pause(timeout=30)
        return m.vcpu_states(), m.memory.read(0, mem)
