"""Pin the KVM structs and ioctl numbers of pagein._abi.kvm against the system headers.

A C probe compiled with /usr/include/linux/kvm.h prints sizeof/offsetof of every struct
and the value of every ioctl macro; the Python side must agree exactly.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pagein._abi import kvm as abi

STRUCTS = {
    "kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size",
                                    "userspace_addr"],
    "kvm_dirty_log": ["slot", "padding1", "dirty_bitmap"],
    "kvm_regs": ["rax", "rdi", "rsp", "r15", "rip", "rflags"],
    "kvm_segment": ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l",
                    "g", "avl", "unusable"],
    "kvm_dtable": ["base", "limit"],
    "kvm_sregs": ["cs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "cr8",
                  "efer", "apic_base", "interrupt_bitmap"],
    "kvm_fpu": ["fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "xmm",
                "mxcsr"],
    "kvm_msr_entry": ["index", "data"],
    "kvm_msrs": ["nmsrs"],
    "kvm_msr_list": ["nmsrs"],
    "kvm_cpuid_entry2": ["function", "index", "flags", "eax", "ebx", "ecx", "edx"],
    "kvm_cpuid2": ["nent"],
    "kvm_xsave": ["region"],
    "kvm_xcr": ["xcr", "value"],
    "kvm_xcrs": ["nr_xcrs", "flags", "xcrs", "padding"],
    "kvm_mp_state": ["mp_state"],
    "kvm_vcpu_events": ["exception", "interrupt", "nmi", "sipi_vector", "flags", "smi",
                        "exception_has_payload", "exception_payload"],
    "kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason",
                "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
                "kvm_valid_regs", "kvm_dirty_regs", "s"],
}
# kvm_run's union members, checked through their C paths.
RUN_UNION = {"exit.io.direction": "io.direction", "exit.io.size": "io.size",
             "exit.io.port": "io.port", "exit.io.count": "io.count",
             "exit.io.data_offset": "io.data_offset", "exit.mmio.phys_addr": "mmio.phys_addr",
             "exit.mmio.data": "mmio.data", "exit.mmio.len": "mmio.len",
             "exit.mmio.is_write": "mmio.is_write", "exit.internal.suberror":
             "internal.suberror", "exit.internal.ndata": "internal.ndata",
             "exit.internal.data": "internal.data",
             "exit.fail_entry.hardware_entry_failure_reason":
             "fail_entry.hardware_entry_failure_reason", "exit.fail_entry.cpu":
             "fail_entry.cpu", "exit.system_event.type": "system_event.type"}
# The kernel calls the triple-fault byte "triple_fault.pending".
EVENT_ALIASES = {"triple_fault_pending": "triple_fault.pending"}


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {", 'printf("{");']
    for name, members in STRUCTS.items():
        lines.append(f'printf("\\"{name}\\": %zu,", sizeof(struct {name}));')
        for m in members:
            lines.append(f'printf("\\"{name}.{m}\\": %zu,", offsetof(struct {name}, {m}));')
    for py, c in {**RUN_UNION}.items():
        lines.append(f'printf("\\"kvm_run.{py}\\": %zu,", offsetof(struct kvm_run, {c}));')
    for py, c in EVENT_ALIASES.items():
        lines.append(f'printf("\\"kvm_vcpu_events.{py}\\": %zu,", '
                     f"offsetof(struct kvm_vcpu_events, {c}));")
    for nr in abi.IoctlNr:
        lines.append(f'printf("\\"KVM_{nr.name}\\": %lu,", (unsigned long)KVM_{nr.name});')
    for reason in abi.ExitReason:
        lines.append(f'printf("\\"KVM_EXIT_{reason.name}\\": %d,", KVM_EXIT_{reason.name});')
    for cap in abi.Cap:
        lines.append(f'printf("\\"KVM_CAP_{cap.name}\\": %d,", KVM_CAP_{cap.name});')
    for mp in abi.MpState:
        lines.append(f'printf("\\"KVM_MP_STATE_{mp.name}\\": %d,", KVM_MP_STATE_{mp.name});')
    lines += ['printf("\\"KVM_API_VERSION\\": %d}", KVM_API_VERSION);', "return 0; }"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and /usr/include/linux/kvm.h (apt-get install gcc linux-libc-dev)")
    d = tmp_path_factory.mktemp("kvmprobe")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True)
    result: dict[str, int] = json.loads(out.stdout)
    return result


def _offset(struct: type[ctypes.Structure], path: str) -> int:
    offset, ctype = 0, struct
    for part in path.split("."):
        field = getattr(ctype, part)
        offset += field.offset
        ctype = dict(ctype._fields_)[part]
    return offset


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_layout_matches_headers(probe: dict[str, int], name: str) -> None:
    struct = getattr(abi, name)
    assert ctypes.sizeof(struct) == probe[name], f"sizeof(struct {name})"
    for member in STRUCTS[name]:
        assert getattr(struct, member).offset == probe[f"{name}.{member}"], f"{name}.{member}"


def test_kvm_run_union_and_event_offsets(probe: dict[str, int]) -> None:
    for path in RUN_UNION:
        assert _offset(abi.kvm_run, path) == probe[f"kvm_run.{path}"], path
    for path in EVENT_ALIASES:
        assert _offset(abi.kvm_vcpu_events, path) == probe[f"kvm_vcpu_events.{path}"], path


@pytest.mark.parametrize("nr", list(abi.IoctlNr), ids=lambda n: n.name)
def test_ioctl_numbers_match_headers(probe: dict[str, int], nr: abi.IoctlNr) -> None:
    assert int(nr) == probe[f"KVM_{nr.name}"]


def test_constants_match_headers(probe: dict[str, int]) -> None:
    assert probe["KVM_API_VERSION"] == abi.KVM_API_VERSION
    for reason in abi.ExitReason:
        assert int(reason) == probe[f"KVM_EXIT_{reason.name}"], reason.name
    for cap in abi.Cap:
        assert int(cap) == probe[f"KVM_CAP_{cap.name}"], cap.name
    for mp in abi.MpState:
        assert int(mp) == probe[f"KVM_MP_STATE_{mp.name}"], mp.name
