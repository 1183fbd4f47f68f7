"""Values decoded from KVM: VM exits and vCPU state (the kernel's structs as dataclasses).

Exits are decoded once, in :mod:`pagein.sys.kvm`, into these types that callers
``match`` on. :class:`Regs` and :class:`Sregs` convert to and from their kernel structs
(``to_c()``/``from_c()``; ``bytes(x.to_c())`` is the raw kernel layout a snapshot can
store). :class:`VcpuState` is everything a snapshot of one vCPU carries.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pagein._abi import kvm as abi

# --- exits ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` (``size`` bytes x ``count``) to ``port``."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``size`` x ``count`` bytes from ``port``: answer with
    :meth:`Vcpu.set_io_in_data` before the next run."""

    port: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class Mmio:
    """The guest accessed ``length`` bytes at ``address``, outside every memory slot."""

    address: int
    length: int
    is_write: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed HLT."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or an exception KVM could not deliver): the guest is dead."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The CPU refused to enter the guest (invalid state)."""

    hardware_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not continue the guest; EMULATION means an instruction KVM had to
    emulate is not supported by its emulator."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GuestException:
    """KVM_EXIT_EXCEPTION (only with guest debugging enabled)."""

    vector: int
    error_code: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash...)."""

    kind: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early: a signal arrived or ``immediate_exit`` was set."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """Any exit reason this VMM does not handle."""

    reason: int
    hardware_reason: int


Exit = (IoOut | IoIn | Mmio | Hlt | Shutdown | FailEntry | InternalError | GuestException
        | SystemEvent | Interrupted | UnknownExit)


# --- typed register state ------------------------------------------------------------


def _to_c(value: Any, ctype: type[abi.Structure]) -> Any:
    return ctype(**{f.name: getattr(value, f.name) for f in fields(value)})


@dataclass(frozen=True, slots=True)
class Regs:
    """General-purpose registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    @classmethod
    def from_c(cls, c: abi.kvm_regs) -> Regs:
        return cls(*(getattr(c, f.name) for f in fields(cls)))

    def to_c(self) -> abi.kvm_regs:
        out = _to_c(self, abi.kvm_regs)
        assert isinstance(out, abi.kvm_regs)
        return out


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register as KVM sees it (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the kernel's name for the 64-bit code flag
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_c(cls, c: abi.kvm_segment) -> Segment:
        return cls(*(getattr(c, f.name) for f in fields(cls)))


@dataclass(frozen=True, slots=True)
class DescriptorTable:
    """GDTR/IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Sregs:
    """Segment, descriptor-table and control registers (``struct kvm_sregs``)."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    @classmethod
    def from_c(cls, c: abi.kvm_sregs) -> Sregs:
        segs = {n: Segment.from_c(getattr(c, n)) for n in abi.SEGMENT_NAMES}
        bitmap = tuple(c.interrupt_bitmap)
        return cls(**segs, gdt=DescriptorTable(c.gdt.base, c.gdt.limit),
                   idt=DescriptorTable(c.idt.base, c.idt.limit), cr0=c.cr0, cr2=c.cr2,
                   cr3=c.cr3, cr4=c.cr4, cr8=c.cr8, efer=c.efer, apic_base=c.apic_base,
                   interrupt_bitmap=(bitmap[0], bitmap[1], bitmap[2], bitmap[3]))

    def to_c(self) -> abi.kvm_sregs:
        out = abi.kvm_sregs()
        for name in abi.SEGMENT_NAMES:
            seg = getattr(out, name)
            for f in fields(Segment):
                setattr(seg, f.name, getattr(getattr(self, name), f.name))
        for name in ("gdt", "idt"):
            table = getattr(out, name)
            table.base = getattr(self, name).base
            table.limit = getattr(self, name).limit
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(out, name, getattr(self, name))
        for i, word in enumerate(self.interrupt_bitmap):
            out.interrupt_bitmap[i] = word
        return out


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2``)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True, slots=True)
class VcpuState:
    """Everything KVM holds for one vCPU that a snapshot must carry.

    ``xsave``, ``xcrs`` and ``events`` are the kernel structs as bytes (they are only
    saved and put back); ``fpu`` is used only when the host has no XSAVE.
    """

    regs: Regs
    sregs: Sregs
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    events: bytes
    mp_state: int
    msrs: tuple[tuple[int, int], ...]
