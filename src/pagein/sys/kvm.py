"""KVM file descriptors: :class:`Kvm` (``/dev/kvm``), :class:`Vm` and :class:`Vcpu`.

One class per fd, as in the kernel's API (Documentation/virt/kvm/api.rst). Exits are
decoded once, here, into typed values (:data:`Exit`, defined with the state types in
:mod:`pagein.sys.kvm_state` and re-exported) that callers ``match`` on. vCPU
state is typed where a VMM reads it (:class:`Regs`, :class:`Sregs`) and opaque bytes
where it only saves and restores it (FPU, XSAVE, XCRs, events): :class:`VcpuState`
holds everything a snapshot needs, and :meth:`Vcpu.get_state` / :meth:`Vcpu.set_state`
move it in the order KVM requires.

``KVM_RUN`` goes through ctypes, which releases the GIL for the duration of the call,
so one Python thread per vCPU runs guests in parallel, and a guest access to
userfaultfd-registered memory blocks only that thread.

Safety: :meth:`Vm.set_memory_region` hands KVM a host address; the mapping must stay
mapped for as long as the slot exists (close the :class:`Vm` first).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from pagein._abi import kvm as abi
from pagein._abi import libc
from pagein._abi.kvm import Cap, ExitReason, IoctlNr, MemFlag, MpState
from pagein.errors import KvmError, Unavailable
from pagein.sys._fd import OwnedFd
from pagein.sys.kvm_state import (
    CpuidEntry,
    DescriptorTable,
    Exit,
    FailEntry,
    GuestException,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Mmio,
    Regs,
    Segment,
    Shutdown,
    Sregs,
    SystemEvent,
    UnknownExit,
    VcpuState,
)
from pagein.sys.mapping import Mapping

__all__ = [
    "SNAPSHOT_MSRS", "Cap", "CpuidEntry", "DescriptorTable", "Exit", "FailEntry",
    "GuestException", "Hlt", "InternalError", "Interrupted", "IoIn", "IoOut", "Kvm",
    "MemFlag", "Mmio", "MpState", "Regs", "Segment", "Shutdown", "Sregs", "SystemEvent",
    "UnknownExit", "Vcpu", "VcpuState", "Vm",
]

# MSRs whose values a guest can observe or depend on after a restore: TSC, SYSENTER,
# PAT, the SYSCALL MSRs, FS/GS bases, TSC_AUX and MISC_ENABLE. Filtered against the
# host's KVM_GET_MSR_INDEX_LIST before use.
SNAPSHOT_MSRS: tuple[int, ...] = (
    0x10, 0x174, 0x175, 0x176, 0x1A0, 0x277,
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
    0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,
)


def _ioctl(fd: int, nr: IoctlNr, arg: int | None, what: str = "") -> int:
    ret: int = libc.ioctl_ptr(fd, int(nr), arg)
    if ret < 0:
        raise KvmError(f"KVM_{nr.name}", libc.get_errno(), what)
    return ret


# --- /dev/kvm ------------------------------------------------------------------------


class Kvm(OwnedFd):
    """The KVM system fd: capabilities, CPUID and MSR lists, and VM creation."""

    @classmethod
    def open(cls, path: str = abi.KVM_DEVICE) -> Kvm:
        """Open ``/dev/kvm`` and check the API version.

        Raises :class:`~pagein.errors.Unavailable` naming what to change when the device
        is missing or not accessible.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Unavailable(
                f"{path} does not exist: load a KVM module (kvm_intel, kvm_amd or kvm_pvm) "
                "or run on a host that exposes virtualization") from None
        except PermissionError:
            raise Unavailable(
                f"no permission to open {path}: run as root or add the user to the group "
                f"that owns it (usually 'kvm')") from None
        kvm = cls(fd)
        version = _ioctl(fd, IoctlNr.GET_API_VERSION, None)
        if version != abi.KVM_API_VERSION:
            kvm.close()
            raise Unavailable(f"{path} speaks KVM API {version}, pagein needs "
                              f"{abi.KVM_API_VERSION}")
        return kvm

    def check_extension(self, cap: Cap) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when unsupported, else a capability-specific value."""
        return _ioctl(self.fileno(), IoctlNr.CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fileno(), IoctlNr.GET_VCPU_MMAP_SIZE, None)

    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """``KVM_GET_SUPPORTED_CPUID``: the leaves a guest may be given."""
        for count in (128, 256, 1024):
            buf, head, entries = abi.cpuid2_buffer(count)
            try:
                _ioctl(self.fileno(), IoctlNr.GET_SUPPORTED_CPUID, libc.buffer_address(buf))
            except KvmError as e:
                if e.errno == errno.E2BIG:
                    continue
                raise
            return tuple(_cpuid_entry(entries[i]) for i in range(head.nent))
        raise KvmError("KVM_GET_SUPPORTED_CPUID", errno.E2BIG, "more than 1024 leaves")

    def msr_index_list(self) -> tuple[int, ...]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores."""
        buf, head, _ = abi.msr_list_buffer(0)
        try:
            _ioctl(self.fileno(), IoctlNr.GET_MSR_INDEX_LIST, libc.buffer_address(buf))
        except KvmError as e:
            if e.errno != errno.E2BIG:  # E2BIG: KVM wrote how many there are
                raise
        buf, head, indices = abi.msr_list_buffer(head.nmsrs)
        _ioctl(self.fileno(), IoctlNr.GET_MSR_INDEX_LIST, libc.buffer_address(buf))
        return tuple(indices[: head.nmsrs])

    def create_vm(self) -> Vm:
        """``KVM_CREATE_VM`` (default machine type)."""
        fd = _ioctl(self.fileno(), IoctlNr.CREATE_VM, 0)
        return Vm(fd, self.vcpu_mmap_size())


def _cpuid_entry(c: abi.kvm_cpuid_entry2) -> CpuidEntry:
    return CpuidEntry(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)


# --- VM ------------------------------------------------------------------------------


class Vm(OwnedFd):
    """One KVM virtual machine: memory slots and vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, cap: Cap) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (some answers, e.g. XSAVE2, are per VM)."""
        return _ioctl(self.fileno(), IoctlNr.CHECK_EXTENSION, int(cap))

    def set_memory_region(self, slot: int, guest_phys: int, mapping: Mapping,
                          flags: MemFlag = MemFlag.NONE) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: back ``[guest_phys, +mapping.length)`` with it.

        Safety: KVM keeps the host address; keep ``mapping`` alive until the VM closes.
        """
        region = abi.kvm_userspace_memory_region(slot, int(flags), guest_phys,
                                                 mapping.length, mapping.address)
        _ioctl(self.fileno(), IoctlNr.SET_USER_MEMORY_REGION, libc.addressof(region),
               f"slot {slot} at guest 0x{guest_phys:x}+0x{mapping.length:x}")

    def get_dirty_log(self, slot: int, pages: int) -> bytearray:
        """``KVM_GET_DIRTY_LOG``: the pages of ``slot`` written since the last call, cleared.

        The slot must have been set with ``MemFlag.LOG_DIRTY_PAGES``. Returns a bitmap,
        bit ``i`` (byte ``i // 8``, bit ``i % 8``) set when page ``i`` of the slot was
        written by the guest; the kernel fills whole u64 words, so the buffer is rounded
        up to 64 pages. Writes this process makes through the slot's mapping are not in
        it (KVM only sees guest writes): the VMM records those itself.

        Safety: the kernel writes ``ceil(pages / 64) * 8`` bytes at the buffer's address.
        """
        buf = bytearray(-(-pages // 64) * 8)
        log = abi.kvm_dirty_log(slot, 0, libc.buffer_address(buf))
        _ioctl(self.fileno(), IoctlNr.GET_DIRTY_LOG, libc.addressof(log),
               f"slot {slot} ({pages} pages)")
        return buf

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages Intel VMX needs for real-mode emulation."""
        _ioctl(self.fileno(), IoctlNr.SET_TSS_ADDR, address)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU`` and map its ``kvm_run`` area."""
        fd = _ioctl(self.fileno(), IoctlNr.CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        try:
            run = Mapping.of_fd(fd, self.vcpu_mmap_size, shared=True)
        except BaseException:
            os.close(fd)
            raise
        return Vcpu(fd, vcpu_id, run)


# --- vCPU ----------------------------------------------------------------------------


class Vcpu(OwnedFd):
    """One vCPU: run it, read and write its state.

    Call :meth:`run` from one thread only; :meth:`request_exit` may be called from any.
    """

    def __init__(self, fd: int, vcpu_id: int, run_area: Mapping) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self._run_area = run_area
        self._run = abi.run_at(run_area.address)
        self._io_data_offset = 0

    # --- running ---------------------------------------------------------------------

    def run(self) -> Exit:
        """``KVM_RUN`` until the next exit, with the GIL released; decode the exit."""
        ret = libc.ioctl_ptr(self.fileno(), int(IoctlNr.RUN), None)
        if ret < 0:
            err = libc.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return Interrupted()
            raise KvmError("KVM_RUN", err, f"vcpu {self.id}")
        return self._decode()

    def _decode(self) -> Exit:
        run = self._run
        reason = run.exit_reason
        ex = run.exit
        if reason == ExitReason.IO:
            io = ex.io
            self._io_data_offset = io.data_offset
            if io.direction == abi.IoDirection.OUT:
                data = self._run_area.read(io.data_offset, io.size * io.count)
                return IoOut(io.port, io.size, io.count, data)
            return IoIn(io.port, io.size, io.count)
        if reason == ExitReason.MMIO:
            mm = ex.mmio
            return Mmio(mm.phys_addr, mm.len, bool(mm.is_write), bytes(mm.data)[: mm.len])
        if reason == ExitReason.HLT:
            return Hlt()
        if reason == ExitReason.SHUTDOWN:
            return Shutdown()
        if reason == ExitReason.FAIL_ENTRY:
            return FailEntry(ex.fail_entry.hardware_entry_failure_reason, ex.fail_entry.cpu)
        if reason == ExitReason.INTERNAL_ERROR:
            n = min(ex.internal.ndata, 16)
            return InternalError(ex.internal.suberror, tuple(ex.internal.data[:n]))
        if reason == ExitReason.EXCEPTION:
            return GuestException(ex.ex.exception, ex.ex.error_code)
        if reason == ExitReason.SYSTEM_EVENT:
            n = min(ex.system_event.ndata, 16)
            return SystemEvent(ex.system_event.type, tuple(ex.system_event.data[:n]))
        if reason == ExitReason.INTR:
            return Interrupted()
        return UnknownExit(reason, ex.hw.hardware_exit_reason)

    def set_io_in_data(self, data: bytes) -> None:
        """Answer the last :class:`IoIn`: KVM copies ``data`` into the guest on next run."""
        self._run_area.write(self._io_data_offset, data)

    def request_exit(self, flag: bool = True) -> None:
        """Set ``kvm_run.immediate_exit``: the next (or a signal-interrupted) KVM_RUN
        returns :class:`Interrupted` at once instead of entering the guest."""
        self._run.immediate_exit = 1 if flag else 0

    def complete_pending_io(self) -> None:
        """Finish the instruction of the last I/O or MMIO exit without running the guest.

        KVM completes a port or MMIO access only on the next KVM_RUN; register state read
        before that is mid-instruction (api.rst, "KVM_RUN"). Running once with
        ``immediate_exit`` set completes it and returns at once. Needed before a snapshot.
        """
        self.request_exit(True)
        try:
            ret = libc.ioctl_ptr(self.fileno(), int(IoctlNr.RUN), None)
            err = libc.get_errno()
            if ret < 0 and err != errno.EINTR:
                raise KvmError("KVM_RUN", err, f"vcpu {self.id} completing pending I/O")
        finally:
            self.request_exit(False)

    # --- state -----------------------------------------------------------------------

    def _get(self, nr: IoctlNr, ctype: type[abi.Structure]) -> Any:
        out = ctype()
        _ioctl(self.fileno(), nr, libc.addressof(out), f"vcpu {self.id}")
        return out

    def _set(self, nr: IoctlNr, value: abi.Structure) -> None:
        _ioctl(self.fileno(), nr, libc.addressof(value), f"vcpu {self.id}")

    def get_regs(self) -> Regs:
        return Regs.from_c(self._get(IoctlNr.GET_REGS, abi.kvm_regs))

    def set_regs(self, regs: Regs) -> None:
        self._set(IoctlNr.SET_REGS, regs.to_c())

    def get_sregs(self) -> Sregs:
        return Sregs.from_c(self._get(IoctlNr.GET_SREGS, abi.kvm_sregs))

    def set_sregs(self, sregs: Sregs) -> None:
        self._set(IoctlNr.SET_SREGS, sregs.to_c())

    def get_mp_state(self) -> int:
        return int(self._get(IoctlNr.GET_MP_STATE, abi.kvm_mp_state).mp_state)

    def set_mp_state(self, state: int) -> None:
        self._set(IoctlNr.SET_MP_STATE, abi.kvm_mp_state(state))

    def _get_bytes(self, nr: IoctlNr, size: int) -> bytes:
        buf = bytearray(size)
        _ioctl(self.fileno(), nr, libc.buffer_address(buf), f"vcpu {self.id}")
        return bytes(buf)

    def _set_bytes(self, nr: IoctlNr, data: bytes) -> None:
        buf = bytearray(data)
        _ioctl(self.fileno(), nr, libc.buffer_address(buf), f"vcpu {self.id}")

    def get_fpu(self) -> bytes:
        return self._get_bytes(IoctlNr.GET_FPU, abi.FPU_BYTES)

    def set_fpu(self, data: bytes) -> None:
        self._set_bytes(IoctlNr.SET_FPU, data)

    def get_xsave(self, size: int = abi.KVM_XSAVE_LEGACY_BYTES) -> bytes:
        """``KVM_GET_XSAVE`` (4 KiB) or ``KVM_GET_XSAVE2`` when ``size`` is larger
        (pass ``Vm.check_extension(Cap.XSAVE2)``)."""
        if size > abi.KVM_XSAVE_LEGACY_BYTES:
            return self._get_bytes(IoctlNr.GET_XSAVE2, size)
        return self._get_bytes(IoctlNr.GET_XSAVE, abi.KVM_XSAVE_LEGACY_BYTES)

    def set_xsave(self, data: bytes) -> None:
        self._set_bytes(IoctlNr.SET_XSAVE, data)

    def get_xcrs(self) -> bytes:
        return self._get_bytes(IoctlNr.GET_XCRS, abi.XCRS_BYTES)

    def set_xcrs(self, data: bytes) -> None:
        self._set_bytes(IoctlNr.SET_XCRS, data)

    def get_events(self) -> bytes:
        return self._get_bytes(IoctlNr.GET_VCPU_EVENTS, abi.EVENTS_BYTES)

    def set_events(self, data: bytes) -> None:
        self._set_bytes(IoctlNr.SET_VCPU_EVENTS, data)

    def get_msrs(self, indices: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """``KVM_GET_MSRS``; MSRs this KVM refuses to read are left out."""
        wanted = list(indices)
        while wanted:
            buf, _head, entries = abi.msrs_buffer(wanted)
            n = _ioctl(self.fileno(), IoctlNr.GET_MSRS, libc.buffer_address(buf))
            if n == len(wanted):
                return tuple((entries[i].index, entries[i].data) for i in range(n))
            del wanted[n]  # KVM stops at the first MSR it cannot read: skip it, retry
        return ()

    def set_msrs(self, msrs: tuple[tuple[int, int], ...]) -> None:
        """``KVM_SET_MSRS``; raises when KVM accepts fewer than all of them."""
        buf, _head, entries = abi.msrs_buffer([i for i, _ in msrs])
        for k, (_, value) in enumerate(msrs):
            entries[k].data = value
        n = _ioctl(self.fileno(), IoctlNr.SET_MSRS, libc.buffer_address(buf))
        if n != len(msrs):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"vcpu {self.id} refused MSR 0x{msrs[n][0]:x}")

    def set_cpuid(self, entries: tuple[CpuidEntry, ...]) -> None:
        """``KVM_SET_CPUID2``: what CPUID reports inside the guest."""
        buf, _head, c_entries = abi.cpuid2_buffer(len(entries))
        for k, e in enumerate(entries):
            c = c_entries[k]
            c.function, c.index, c.flags = e.function, e.index, e.flags
            c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl(self.fileno(), IoctlNr.SET_CPUID2, libc.buffer_address(buf), f"vcpu {self.id}")

    def get_state(self, msr_indices: tuple[int, ...] = SNAPSHOT_MSRS,
                  xsave_size: int = abi.KVM_XSAVE_LEGACY_BYTES) -> VcpuState:
        """Read everything a snapshot needs. Call :meth:`complete_pending_io` first if
        the last exit was I/O, and only while no thread is in :meth:`run`."""
        return VcpuState(
            mp_state=self.get_mp_state(), regs=self.get_regs(), sregs=self.get_sregs(),
            fpu=self.get_fpu(), xsave=self.get_xsave(xsave_size), xcrs=self.get_xcrs(),
            msrs=self.get_msrs(msr_indices), events=self.get_events())

    def set_state(self, state: VcpuState) -> None:
        """Write a :class:`VcpuState` back, in Firecracker's restore order (CPUID must
        already be set): MP state, regs, sregs, FPU/XSAVE, XCRs, MSRs, then events last
        because setting sregs and MSRs can clear pending-event state."""
        self.set_mp_state(state.mp_state)
        self.set_regs(state.regs)
        self.set_sregs(state.sregs)
        self.set_fpu(state.fpu)
        if state.xsave:
            self.set_xsave(state.xsave)
        if state.xcrs:
            self.set_xcrs(state.xcrs)
        if state.msrs:
            self.set_msrs(state.msrs)
        self.set_events(state.events)

    def close(self) -> None:
        if not self.closed:
            self._run_area.close()
        super().close()
