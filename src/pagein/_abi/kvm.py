"""``<linux/kvm.h>`` and ``<asm/kvm.h>`` (x86-64): structs, constants, ioctl numbers.

Only what pagein's VMM uses: the system ioctls on ``/dev/kvm``, the VM ioctls for memory
slots and vCPUs, and the vCPU ioctls for running and for getting/setting every piece of
state a snapshot needs (regs, sregs, FPU, XSAVE, XCRs, MSRs, events, MP state, CPUID).

Variable-length structs (``kvm_cpuid2``, ``kvm_msrs``, ``kvm_msr_list``) are declared
without their flexible array, exactly as their ``sizeof`` in C, because the ioctl number
encodes that size; callers append the entries in a larger buffer.

Layouts and numbers are pinned by ``tests/unit/test_abi_kvm.py`` against a C probe
compiled with ``/usr/include/linux/kvm.h``.
"""

from __future__ import annotations

import ctypes
import enum

from pagein._abi.ioctl import io, ior, iow, iowr

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s64 = ctypes.c_int64

KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_DEVICE = "/dev/kvm"
KVM_NR_INTERRUPTS = 256
KVM_MAX_XCRS = 16
KVM_XSAVE_LEGACY_BYTES = 4096


# --- structs -------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(ctypes.Structure):
    # The kernel's dirty_bitmap is a union with a u64 pad: a user pointer, one bit per page.
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(ctypes.Structure):
    _fields_ = [*((name, kvm_segment) for name in SEGMENT_NAMES),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; ``nmsrs`` :class:`kvm_msr_entry` follow it."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; ``nmsrs`` u32 indices follow it."""

    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``nent`` :class:`kvm_cpuid_entry2` follow it."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE2 may use a larger buffer)."""

    _fields_ = [("region", u32 * (KVM_XSAVE_LEGACY_BYTES // 4))]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class _events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("exception", _events_exception), ("interrupt", _events_interrupt),
                ("nmi", _events_nmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", _events_smi), ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


# --- kvm_run: the page shared with the kernel after every exit -------------------------


class _run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_exit(ctypes.Union):
    _fields_ = [("hw", _run_hw), ("fail_entry", _run_fail_entry), ("ex", _run_ex),
                ("io", _run_io), ("mmio", _run_mmio), ("internal", _run_internal),
                ("system_event", _run_system_event), ("padding", u8 * 256)]


class kvm_run(ctypes.Structure):
    """The fixed head of ``struct kvm_run`` (the mmap'd area is larger: I/O data follows)."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", u8 * 2048)]


# --- constants -----------------------------------------------------------------------


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37


class IoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


class InternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class Cap(enum.IntEnum):
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    SYNC_MMU = 16
    VCPU_EVENTS = 41
    XSAVE = 55
    XCRS = 56
    MAX_VCPUS = 66
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    XSAVE2 = 208


class MemFlag(enum.IntFlag):
    NONE = 0
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


# --- ioctl numbers -------------------------------------------------------------------


class IoctlNr(enum.IntEnum):
    # system (/dev/kvm)
    GET_API_VERSION = io(KVMIO, 0x00)
    CREATE_VM = io(KVMIO, 0x01)
    GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, kvm_msr_list)
    CHECK_EXTENSION = io(KVMIO, 0x03)
    GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04)
    GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, kvm_cpuid2)
    # VM
    CREATE_VCPU = io(KVMIO, 0x41)
    GET_DIRTY_LOG = iow(KVMIO, 0x42, kvm_dirty_log)
    SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, kvm_userspace_memory_region)
    SET_TSS_ADDR = io(KVMIO, 0x47)
    SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, u64)
    # vCPU
    RUN = io(KVMIO, 0x80)
    GET_REGS = ior(KVMIO, 0x81, kvm_regs)
    SET_REGS = iow(KVMIO, 0x82, kvm_regs)
    GET_SREGS = ior(KVMIO, 0x83, kvm_sregs)
    SET_SREGS = iow(KVMIO, 0x84, kvm_sregs)
    GET_MSRS = iowr(KVMIO, 0x88, kvm_msrs)
    SET_MSRS = iow(KVMIO, 0x89, kvm_msrs)
    GET_FPU = ior(KVMIO, 0x8C, kvm_fpu)
    SET_FPU = iow(KVMIO, 0x8D, kvm_fpu)
    SET_CPUID2 = iow(KVMIO, 0x90, kvm_cpuid2)
    GET_CPUID2 = iowr(KVMIO, 0x91, kvm_cpuid2)
    GET_MP_STATE = ior(KVMIO, 0x98, kvm_mp_state)
    SET_MP_STATE = iow(KVMIO, 0x99, kvm_mp_state)
    GET_VCPU_EVENTS = ior(KVMIO, 0x9F, kvm_vcpu_events)
    SET_VCPU_EVENTS = iow(KVMIO, 0xA0, kvm_vcpu_events)
    GET_XSAVE = ior(KVMIO, 0xA4, kvm_xsave)
    SET_XSAVE = iow(KVMIO, 0xA5, kvm_xsave)
    GET_XCRS = ior(KVMIO, 0xA6, kvm_xcrs)
    SET_XCRS = iow(KVMIO, 0xA7, kvm_xcrs)
    GET_XSAVE2 = ior(KVMIO, 0xCF, kvm_xsave)


# --- buffers for the variable-length structs ------------------------------------------
# Each returns the backing bytearray (pass ``libc.buffer_address(buf)`` to the ioctl and
# keep ``buf`` alive while using the views), the header and the entry array over it.

Structure = ctypes.Structure
FPU_BYTES = ctypes.sizeof(kvm_fpu)
XCRS_BYTES = ctypes.sizeof(kvm_xcrs)
EVENTS_BYTES = ctypes.sizeof(kvm_vcpu_events)


def run_at(address: int) -> kvm_run:
    """View the mmap'd ``kvm_run`` of a vCPU. Safety: valid while the mapping lives."""
    return kvm_run.from_address(address)


def cpuid2_buffer(count: int) -> tuple[bytearray, kvm_cpuid2,
                                        ctypes.Array[kvm_cpuid_entry2]]:
    head_size = ctypes.sizeof(kvm_cpuid2)
    buf = bytearray(head_size + count * ctypes.sizeof(kvm_cpuid_entry2))
    head = kvm_cpuid2.from_buffer(buf)
    head.nent = count
    return buf, head, (kvm_cpuid_entry2 * count).from_buffer(buf, head_size)


def msrs_buffer(indices: list[int]) -> tuple[bytearray, kvm_msrs,
                                              ctypes.Array[kvm_msr_entry]]:
    n, head_size = len(indices), ctypes.sizeof(kvm_msrs)
    buf = bytearray(head_size + n * ctypes.sizeof(kvm_msr_entry))
    head = kvm_msrs.from_buffer(buf)
    head.nmsrs = n
    entries = (kvm_msr_entry * n).from_buffer(buf, head_size)
    for k, index in enumerate(indices):
        entries[k].index = index
    return buf, head, entries


def msr_list_buffer(count: int) -> tuple[bytearray, kvm_msr_list, ctypes.Array[u32]]:
    head_size = ctypes.sizeof(kvm_msr_list)
    buf = bytearray(head_size + count * ctypes.sizeof(u32))
    head = kvm_msr_list.from_buffer(buf)
    head.nmsrs = count
    return buf, head, (u32 * count).from_buffer(buf, head_size)
