"""Each way a guest or its setup can fail gives one clear error."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pagein.errors import Unavailable
from pagein.vmm import layout
from pagein.vmm.image import workload_image
from pagein.vmm.machine import GuestFault, Machine
from pagein.vmm.workloads import Fault, function_args, hello_args

MiB = 1 << 20
ON_PVM = Path("/sys/module/kvm_pvm").exists()


def _crash(fault: Fault, address: int = 0, *, vcpus: int = 1, cpl: int = 3) -> GuestFault:
    with Machine.create(32 * MiB, vcpus) as m:
        m.boot(workload_image("hello"), hello_args(0, fault, address).args, cpl=cpl)
        m.start()
        with pytest.raises(GuestFault) as info:
            m.wait(timeout=60)
        assert m.console.output().startswith(b"hello from vcpu 0\n")
    return info.value


def test_missing_kvm_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match=r"does not exist: load a KVM module"):
        Machine.create(32 * MiB, 1, kvm_path=str(tmp_path / "kvm"))


def test_kvm_without_permission_is_unavailable(tmp_path: Path) -> None:
    # Root opens anything, so make a copy of the device node with mode 000 and open it
    # from a child whose capabilities cannot override file permissions.
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (mknod) and setpriv (util-linux)")
    node = tmp_path / "kvm"
    os.mknod(node, 0o000 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    code = ("import sys\nfrom pagein.sys.kvm import Kvm\nfrom pagein.errors import Unavailable\n"
            "try:\n    Kvm.open(sys.argv[1])\nexcept Unavailable as e:\n    print(e)\n")
    res = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                          sys.executable, "-c", code, str(node)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert f"no permission to open {node}: run as root or add the user to the group" \
        in res.stdout, res.stderr


def test_guest_too_small_is_refused_before_start() -> None:
    wa = function_args(64 * MiB)
    with Machine.create(32 * MiB, 1) as m:
        with pytest.raises(ValueError, match=r"32 MiB is too small for workload 'function'"
                                             r": it needs at least 88 MiB \(raise --mem\)"):
            m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        assert m.vcpus[0].get_regs().rip == 0xFFF0  # never set up, never run


def test_null_store_reports_registers_and_cr2() -> None:
    err = _crash(Fault.STORE, 0, vcpus=4)
    assert err.vcpu == 0 and err.sregs is not None and err.regs is not None
    assert err.sregs.cr2 == 0
    assert layout.IMAGE_BASE <= err.regs.rip < layout.IMAGE_LIMIT
    assert "vCPU 0 triple-faulted" in str(err) and "cr2=0x0 " in str(err)
    assert "NULL dereference" in str(err)
    assert f"rip=0x{err.regs.rip:x}" in str(err)


def test_store_beyond_ram_names_the_address() -> None:
    err = _crash(Fault.STORE, 1 << 36)
    assert err.sregs is not None and err.sregs.cr2 == 1 << 36
    assert "cr2=0x1000000000" in str(err) and "beyond guest RAM (0x2000000 bytes)" in str(err)


def test_store_to_parameter_page_faults() -> None:
    assert "read-only parameter page" in str(_crash(Fault.STORE, 0x200040))


@pytest.mark.parametrize("fault", [Fault.HLT, Fault.UD2])
def test_privileged_or_invalid_instruction_triple_faults(fault: Fault) -> None:
    err = _crash(fault)
    assert "no IDT to handle it" in str(err) and "cs=0x23" in str(err)


def test_sse_runs_at_cpl3() -> None:
    with Machine.create(32 * MiB, 1) as m:
        m.boot(workload_image("hello"), hello_args(5, Fault.SSE).args)
        m.start()
        assert m.wait(timeout=60).status == 5
        assert m.console.output() == b"hello from vcpu 0\n42\n"


@pytest.mark.skipif(not ON_PVM, reason="only kvm_pvm emulates CPL 0 code")
def test_privileged_code_on_pvm_is_an_emulation_failure() -> None:
    err = _crash(Fault.SSE, cpl=0)
    assert "KVM emulation failure" in str(err)
    assert "privileged guest code cannot run on this KVM" in str(err)
