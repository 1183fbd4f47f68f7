"""Experiment 8 — the guest's view: a guest access that misses, seen from both sides.

A ``scan`` guest fills its heap, says READY, and is paused and snapshotted (memory and
vCPU state). It is then restored twice into a new VM: once with its memory copied in
eagerly, once on empty memory registered with userfaultfd and served by a forked
handler. In the lazy run every first guest access to a page misses in KVM's MMU; KVM
resolves it by faulting on the VMM's own mapping of guest RAM, inside ``KVM_RUN``, and
that host fault goes to userfaultfd. The vCPU thread sleeps in the kernel until the
handler fills the page: the VMM sees no extra exit, only the handler sees the faults.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagein._abi.libc import buffer_address
from pagein.errors import PageinError
from pagein.lab._probe import MIB, PAGE_SIZE, Recorder, Row
from pagein.lab._procs import WAIT_S, CopyPolicy, FaultHandler, HandlerStats
from pagein.sys.kvm import VcpuState
from pagein.sys.mapping import Mapping
from pagein.sys.uffd import RegisterMode, Userfaultfd
from pagein.vmm.image import workload_image
from pagein.vmm.layout import HEAP_START, LARGE_PAGE
from pagein.vmm.machine import Machine, RunResult
from pagein.vmm.memory import GuestMemory, Region
from pagein.vmm.reference import scan_line
from pagein.vmm.workloads import Op, Pattern, WorkloadArgs, scan_args

__all__ = ["GuestRun", "GuestView", "run"]


@dataclass(frozen=True, slots=True)
class GuestRun:
    """One restored run of the guest, counted on the VMM's side and the handler's."""

    restore: str
    status: int
    output_matches_reference: bool
    exits_total: int  # VM exits the VMM handled (port I/O, kicks...)
    exits: str  # by kind
    vmm_minor_faults: int  # minflt of the VMM process during the run (vCPU thread included)
    uffd: HandlerStats  # what the fault handler saw (nothing for the eager run)


@dataclass(frozen=True, slots=True)
class GuestView:
    """The same guest run restored eagerly and lazily."""

    size_bytes: int  # the heap the guest scans
    memory_bytes: int  # guest RAM: system area + heap
    heap_pages: int
    eager: GuestRun
    lazy: GuestRun
    rows: tuple[Row, ...]


def _snapshot(mem: int, wa: WorkloadArgs) -> tuple[list[VcpuState], bytes]:
    """Boot the guest, let it fill its heap, pause it at READY, return state and memory."""
    with Machine.create(mem, 1) as m:
        m.pause_on_ready = True
        m.boot(workload_image("scan"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(WAIT_S):
            raise PageinError(f"the scan guest did not say READY within {WAIT_S:.0f} s")
        m.pause(timeout=WAIT_S)
        return m.vcpu_states(), m.memory.read(0, mem)


def _run(rec: Recorder, label: str, mapping: Mapping,
         states: list[VcpuState]) -> tuple[RunResult, str]:
    """Start a VM on ``mapping`` from ``states`` and run the guest to its end."""
    memory = GuestMemory.from_mappings([Region(0, mapping)])
    with Machine(memory, 1) as vm:
        vm.set_vcpu_states(states)
        with rec.step(label, mapping.address, mapping.length):
            vm.start()
            result = vm.wait(timeout=WAIT_S)
        lines = vm.console.output().decode(errors="replace").strip().splitlines()
    return result, lines[-1] if lines else ""


def _summary(label: str, result: RunResult, line: str, expected: str, row: Row,
             stats: HandlerStats) -> GuestRun:
    exits = ", ".join(f"{k} {v}" for k, v in sorted(result.exits.items()))
    return GuestRun(label, result.status, line == expected, sum(result.exits.values()),
                    exits, row.minor_faults, stats)


def run(size_bytes: int = 64 * MIB) -> GuestView:
    """Snapshot a scanning guest at READY, then restore it by copy and by userfaultfd."""
    heap = -(-size_bytes // LARGE_PAGE) * LARGE_PAGE
    mem = HEAP_START + heap
    wa = scan_args(Pattern.SEQUENTIAL, Op.READ, size_bytes=heap)
    expected = scan_line(wa.args, heap)
    states, image = _snapshot(mem, wa)
    rec = Recorder()
    with Mapping.anonymous(mem) as mapping:
        mapping.write(0, image)
        result, line = _run(rec, "eager copy: guest scans its heap", mapping, states)
        eager = _summary("eager copy", result, line, expected, rec.last(), HandlerStats())
    rec.annotate(f"{eager.exits_total} VM exits, no uffd")
    src = bytearray(image)  # the handler copies from here
    del image
    with Mapping.anonymous(mem) as mapping, Userfaultfd.open() as uffd:
        uffd.register(mapping.address, mem, RegisterMode.MISSING)
        # Forked before the VM exists: the handler holds no KVM fd and no vCPU thread.
        policy = CopyPolicy(mapping.address, buffer_address(src))
        with FaultHandler(uffd, policy, (mapping.address, mem)) as handler:
            result, line = _run(rec, "userfaultfd: guest scans its heap", mapping, states)
            stats = handler.stop()
        uffd.unregister(mapping.address, mem)
    lazy = _summary("userfaultfd", result, line, expected, rec.last(), stats)
    rec.annotate(f"{lazy.exits_total} VM exits, {stats.faults} uffd faults")
    return GuestView(size_bytes=heap, memory_bytes=mem, heap_pages=heap // PAGE_SIZE,
                     eager=eager, lazy=lazy, rows=rec.rows())
