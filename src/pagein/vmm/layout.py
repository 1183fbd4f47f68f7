"""Guest-physical memory layout and the machine state the VMM prepares for CPL 3.

There is no guest kernel: the VMM writes the page tables, the GDT and a TSS into guest
memory and loads the control registers itself, so the first instruction the vCPU runs
is the workload's, in 64-bit mode at CPL 3 with IOPL 3 (port I/O allowed). On
``kvm_pvm`` CPL 3 code runs natively while CPL 0 code would be emulated, slowly.

Guest-physical = guest-virtual (identity map with 2 MiB pages)::

    0x000000  +---------------------------+  supervisor-only 2 MiB page: a NULL
              | GDT 0x1000, TSS 0x6000,   |  dereference by the guest faults
              | PML4 0x3000, PDPT 0x4000, |
              | PDs from 0x10000          |
    0x200000  +---------------------------+  read-only to the guest
              | parameter page (abi.py)   |
    0x400000  +---------------------------+
              | guest image (ELF, 4 MiB)  |
    0x800000  +---------------------------+
              | vCPU stacks, 128 KiB each |
    0xA00000  +---------------------------+
              | (unused)                  |
    16 MiB    +---------------------------+
              | heap: the workload's      |
              | memory, up to mem_size    |
              +---------------------------+
"""

from __future__ import annotations

import struct
from dataclasses import replace

from pagein.sys.kvm import DescriptorTable, Regs, Segment, Sregs

MiB = 1 << 20
GiB = 1 << 30
LARGE_PAGE = 2 * MiB

GDT_ADDR = 0x1000
TSS_ADDR = 0x6000
PML4_ADDR = 0x3000
PDPT_ADDR = 0x4000
PD_ADDR = 0x10000
IMAGE_BASE = 0x400000
IMAGE_LIMIT = 0x800000
STACKS_BASE = 0x800000
STACK_SIZE = 128 * 1024
MAX_VCPUS = 16
HEAP_START = 16 * MiB
MIN_MEM = HEAP_START + LARGE_PAGE
MAX_MEM = 64 * GiB  # PDs for 64 GiB fill 0x10000-0x50000 of the system page

# Page-table entry bits.
_P, _RW, _US, _PS = 1, 2, 4, 0x80

# GDT selectors: user segments carry RPL 3.
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
_GDT = (
    0,
    0x00AF9B000000FFFF,  # 0x08 kernel code, 64-bit (unused; a GDT without one confuses tools)
    0x00CF93000000FFFF,  # 0x10 kernel data
    0x00CFF3000000FFFF,  # 0x18 user data, DPL 3
    0x00AFFB000000FFFF,  # 0x20 user code, 64-bit, DPL 3
)
TSS_BYTES = 104
# An all-zero I/O permission bitmap (65536 ports) plus the 0xFF terminator byte. kvm_pvm
# forces RFLAGS.IOPL to 0, so port I/O at CPL 3 is allowed only by this bitmap; on
# VMX/SVM, IOPL 3 alone would do.
IO_BITMAP_BYTES = 65536 // 8 + 1
TSS_LIMIT = TSS_BYTES + IO_BITMAP_BYTES - 1

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED, RFLAGS_IOPL3 = 0x2, 0x3000


def check_memory_size(mem_size: int) -> None:
    """Refuse sizes the page tables cannot map (one sentence naming the limits)."""
    if mem_size % LARGE_PAGE or not MIN_MEM <= mem_size <= MAX_MEM:
        raise ValueError(f"guest memory of {mem_size} bytes must be a multiple of 2 MiB "
                         f"between {MIN_MEM // MiB} MiB and {MAX_MEM // GiB} GiB")


def system_tables(mem_size: int) -> list[tuple[int, bytes]]:
    """Return ``(guest address, bytes)`` pieces: page tables, GDT with a TSS descriptor,
    TSS. Everything lives in the first 2 MiB, which the guest cannot reach at CPL 3."""
    check_memory_size(mem_size)
    gigs = (mem_size + GiB - 1) // GiB
    pieces = [(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | _P | _RW | _US))]
    pieces.append((PDPT_ADDR, struct.pack(f"<{gigs}Q", *(
        (PD_ADDR + g * 0x1000) | _P | _RW | _US for g in range(gigs)))))
    entries = []
    for i in range(mem_size // LARGE_PAGE):
        flags = _P | _RW | _US | _PS
        if i == 0:
            flags = _P | _RW | _PS      # system page: supervisor-only
        elif i == 1:
            flags = _P | _US | _PS      # parameter page: read-only
        entries.append(i * LARGE_PAGE | flags)
    pieces.append((PD_ADDR, struct.pack(f"<{len(entries)}Q", *entries)))
    tss_low = (TSS_LIMIT & 0xFFFF) | ((TSS_ADDR & 0xFFFFFF) << 16) | (0x89 << 40) \
        | (((TSS_ADDR >> 24) & 0xFF) << 56)
    gdt = struct.pack("<7Q", *_GDT, tss_low, TSS_ADDR >> 32)
    pieces.append((GDT_ADDR, gdt))
    tss = bytearray(TSS_BYTES + IO_BITMAP_BYTES)
    struct.pack_into("<H", tss, 102, TSS_BYTES)  # iomap_base: the bitmap follows the TSS
    tss[-1] = 0xFF
    pieces.append((TSS_ADDR, bytes(tss)))
    return pieces


def stack_top(vcpu_id: int) -> int:
    if not 0 <= vcpu_id < MAX_VCPUS:
        raise ValueError(f"vCPU id {vcpu_id} outside 0..{MAX_VCPUS - 1}")
    return STACKS_BASE + (vcpu_id + 1) * STACK_SIZE


def boot_sregs(initial: Sregs, cpl: int = 3) -> Sregs:
    """Long mode, paging on, CS/SS at DPL ``cpl``: at 3 the vCPU starts in user mode.

    ``cpl=0`` exists to show what kvm_pvm does with privileged guest code (it emulates
    it, ~2000x slower, and fails on e.g. SSE); VMX/SVM hosts run either natively.
    """
    if cpl not in (0, 3):
        raise ValueError(f"cpl={cpl} must be 3 (user mode) or 0 (kernel mode)")
    code = Segment(base=0, limit=0xFFFFFFFF, selector=USER_CS if cpl else KERNEL_CS, type=11,
                   present=1, dpl=cpl, db=0, s=1, l=1, g=1)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=USER_DS if cpl else KERNEL_DS, type=3,
                   present=1, dpl=cpl, db=1, s=1, l=0, g=1)
    tr = Segment(base=TSS_ADDR, limit=TSS_LIMIT, selector=TSS_SEL, type=11, present=1)
    return replace(
        initial, cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tr,
        gdt=DescriptorTable(GDT_ADDR, len(_GDT) * 8 + 16 - 1),
        idt=DescriptorTable(0, 0),  # no IDT: any guest exception is a triple fault
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3=PML4_ADDR, cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA)


def boot_regs(vcpu_id: int, entry: int, params_addr: int) -> Regs:
    """RIP at the entry, RDI = vCPU id, RSI = parameter page, own stack, IOPL 3."""
    return Regs(rip=entry, rdi=vcpu_id, rsi=params_addr, rsp=stack_top(vcpu_id),
                rflags=RFLAGS_RESERVED | RFLAGS_IOPL3)
