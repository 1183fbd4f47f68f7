"""The virtual machine: KVM fds, guest memory slots, vCPU threads and the guest ABI.

A :class:`Machine` owns a :class:`~pagein.sys.kvm.Vm` with one memory slot per
:class:`~pagein.vmm.memory.Region` and N vCPUs, each run by its own Python thread
(``KVM_RUN`` releases the GIL). Two ways in:

* fresh boot: :meth:`Machine.create` then :meth:`boot` writes page tables, GDT/TSS,
  the parameter page and the image, and sets every vCPU to enter the workload at CPL 3;
* restore: build ``GuestMemory.from_mappings(...)`` (e.g. uffd-registered memory), pass it
  to :class:`Machine`, :meth:`set_vcpu_states`, then :meth:`start` — no boot.

:meth:`pause` stops every vCPU at an instruction boundary (pending port I/O completed)
so :meth:`vcpu_states` is consistent; :meth:`resume` continues. Blocking guest calls
(READ, BARRIER) return ``RETRY`` to the guest when a pause cuts them short, so a paused
guest never sits inside a half-done request.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from pagein.errors import GuestError, PageinError
from pagein.sys.kvm import (
    SNAPSHOT_MSRS,
    Cap,
    Exit,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Kvm,
    Mmio,
    Regs,
    Shutdown,
    Sregs,
    Vcpu,
    VcpuState,
)
from pagein.vmm import abi, layout
from pagein.vmm.abi import Port
from pagein.vmm.console import Console
from pagein.vmm.dirty import DirtyLog
from pagein.vmm.image import GuestImage
from pagein.vmm.memory import Backing, GuestMemory

__all__ = ["KICK_SIGNAL", "GuestFault", "Machine", "RunResult"]

# Sent to a vCPU thread to pull it out of KVM_RUN (with kvm_run.immediate_exit set, so a
# signal that lands just before KVM_RUN is not lost). Needs a handler, else the default
# action would kill the process: installed by Machine.start when on the main thread.
KICK_SIGNAL = signal.SIGUSR2
_EMULATION = 1


class GuestFault(GuestError):
    """The guest died on vCPU ``vcpu``: ``regs``/``sregs`` hold its state at the time."""

    def __init__(self, message: str, vcpu: int, regs: Regs | None, sregs: Sregs | None):
        self.vcpu = vcpu
        self.regs = regs
        self.sregs = sregs
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How the guest ended: its exit status, exit counts by kind, wall time from start,
    and the time from start to the guest's READY (None if it never said it)."""

    status: int
    exits: dict[str, int] = field(default_factory=dict)
    run_seconds: float = 0.0
    ready_seconds: float | None = None


class _Stopped(Exception):
    """This vCPU's thread is done (EXIT, STOP or a stop request)."""


class Machine:
    """A KVM VM with guest memory, N vCPUs and the pagein guest ABI."""

    def __init__(self, memory: GuestMemory, vcpus: int, *, console: Console | None = None,
                 own_memory: bool = False, kvm_path: str = "/dev/kvm") -> None:
        if not 1 <= vcpus <= layout.MAX_VCPUS:
            raise ValueError(f"a VM of {vcpus} vCPUs: pagein's VMM runs 1 to "
                             f"{layout.MAX_VCPUS} vCPUs")
        self.memory = memory
        self.console = console or Console()
        self.ready = threading.Event()
        self.pause_on_ready = False
        self._own_memory = own_memory
        self._cond = threading.Condition()
        self._stop = False
        self._pause = False
        self._parked = 0
        self._active = set(range(vcpus))
        self._barrier_arrived: set[int] = set()
        self._barrier_gen = 0
        self._status: int | None = None
        self._error: BaseException | None = None
        self._exits: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        # vCPU id -> thread ident of threads still in their run loop. A thread leaves it
        # only under _kick_lock, so a kick never signals a thread that has exited.
        self._kick_lock = threading.Lock()
        self._kickable: dict[int, int] = {}
        self._t0 = self._t1 = 0.0
        self._ready_at: float | None = None
        # Pages changed since ``parent`` (a snapshot directory and the SHA-256 of its state
        # file): what a diff snapshot writes. Both set by enable_dirty_tracking / a snapshot.
        self.dirty: DirtyLog | None = None
        self.parent: tuple[str, str] | None = None
        _install_kick_handler()
        self.kvm = Kvm.open(kvm_path)
        self.vcpus: list[Vcpu] = []
        try:
            self.vm = self.kvm.create_vm()
            for slot, region in enumerate(memory.regions):
                self.vm.set_memory_region(slot, region.guest_phys, region.mapping)
            self.cpuid = self.kvm.supported_cpuid()
            self.msr_indices = tuple(sorted(set(SNAPSHOT_MSRS) & set(self.kvm.msr_index_list())))
            self.xsave_size = max(self.vm.check_extension(Cap.XSAVE2), 4096)
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                self.vcpus.append(vcpu)
                # Guest code built by gcc may use SSE; KVM also checks CPUID.LM before
                # accepting EFER.LME in KVM_SET_SREGS.
                vcpu.set_cpuid(self.cpuid)
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, mem_size: int, vcpus: int = 1, *, backing: Backing = Backing.ANONYMOUS,
               console: Console | None = None, kvm_path: str = "/dev/kvm") -> Machine:
        """A machine with fresh guest RAM of ``mem_size`` bytes, owned by the machine."""
        layout.check_memory_size(mem_size)
        memory = GuestMemory.create(mem_size, backing)
        try:
            return cls(memory, vcpus, console=console, own_memory=True, kvm_path=kvm_path)
        except BaseException:
            memory.close()
            raise

    def enable_dirty_tracking(self, parent: tuple[str, str] | None = None) -> None:
        """Log every page written from now on (guest and VMM): needed for diff snapshots.

        ``parent`` is the snapshot this memory equals now (a restore's), if any.
        """
        if self.dirty is None:
            self.dirty = DirtyLog(self.vm, self.memory)
        self.parent = parent

    # --- boot --------------------------------------------------------------------------

    def boot(self, image: GuestImage, args: tuple[int, ...] = (), *,
             min_heap_bytes: int = 0, cpl: int = 3) -> None:
        """Write the machine tables, parameter page and ``image`` into guest RAM and set
        every vCPU to enter it at CPL 3 (``cpl=0`` only to demonstrate kvm_pvm's limits).

        Raises ``ValueError`` before anything runs when guest RAM is smaller than the
        layout plus ``min_heap_bytes`` the workload needs.
        """
        mem_end = self.memory.end
        need = max(layout.HEAP_START + min_heap_bytes, layout.MIN_MEM)
        need = -(-need // layout.LARGE_PAGE) * layout.LARGE_PAGE
        if mem_end < need:
            raise ValueError(
                f"guest memory of {mem_end >> 20} MiB is too small for workload "
                f"{image.name!r}: it needs at least {need >> 20} MiB (raise --mem)")
        for address, data in layout.system_tables(mem_end):
            self.memory.write(address, data)
        params = abi.Params(mem_size=mem_end, vcpus=len(self.vcpus),
                            heap_start=layout.HEAP_START, heap_end=mem_end, args=args)
        self.memory.write(abi.PARAMS_ADDR, params.pack())
        for seg in image.segments:
            self.memory.write(seg.address, seg.data + bytes(seg.memory_size - len(seg.data)))
        for vcpu in self.vcpus:
            vcpu.set_sregs(layout.boot_sregs(vcpu.get_sregs(), cpl))
            vcpu.set_regs(layout.boot_regs(vcpu.id, image.entry, abi.PARAMS_ADDR))

    # --- state for snapshot/restore ----------------------------------------------------

    def vcpu_states(self) -> list[VcpuState]:
        """Every vCPU's state; only while paused (or before start / after the end)."""
        if self._threads and not self._quiescent():
            raise RuntimeError("vCPU state can only be read while the machine is paused")
        return [v.get_state(self.msr_indices, self.xsave_size) for v in self.vcpus]

    def set_vcpu_states(self, states: list[VcpuState]) -> None:
        """Load saved vCPU states (CPUID is already set) before :meth:`start`."""
        if len(states) != len(self.vcpus):
            raise ValueError(f"{len(states)} vCPU states for a machine with "
                             f"{len(self.vcpus)} vCPUs")
        for vcpu, state in zip(self.vcpus, states, strict=True):
            vcpu.set_state(state)

    def _quiescent(self) -> bool:
        with self._cond:
            return self._parked == len(self._active) or not any(
                t.is_alive() for t in self._threads)

    # --- running -----------------------------------------------------------------------

    def start(self, vcpu_ids: Collection[int] | None = None) -> None:
        """Start one thread per vCPU (or only ``vcpu_ids``: a restore must not run a
        vCPU that had already stopped when the snapshot was taken)."""
        if self._threads:
            raise RuntimeError("machine already started")
        ids = set(range(len(self.vcpus)) if vcpu_ids is None else vcpu_ids)
        if not ids or not ids <= set(range(len(self.vcpus))):
            raise ValueError(f"vCPU ids {sorted(ids)} must be a non-empty subset of "
                             f"0..{len(self.vcpus) - 1}")
        _install_kick_handler()
        self._active = set(ids)
        self._t0 = time.monotonic()
        for vcpu in self.vcpus:
            if vcpu.id not in ids:
                continue
            t = threading.Thread(target=self._vcpu_main, args=(vcpu,),
                                 name=f"pagein-vcpu{vcpu.id}", daemon=True)
            self._threads.append(t)
            t.start()

    @property
    def active_vcpus(self) -> frozenset[int]:
        """vCPUs that have not stopped (pass them to ``start`` after a restore)."""
        with self._cond:
            return frozenset(self._active)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the guest to end; return its status or raise its error.

        On ``timeout`` the machine is stopped and ``TimeoutError`` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            if t.is_alive():
                self.stop()
                raise TimeoutError(f"the guest did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.result()

    def result(self) -> RunResult:
        with self._cond:
            end = self._t1 or time.monotonic()
            ready = None if self._ready_at is None else self._ready_at - self._t0
            return RunResult(self._status or 0, dict(self._exits), end - self._t0, ready)

    def stop(self) -> None:
        """Ask every vCPU thread to end (used on errors, timeouts and close)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._kick_all()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU at an instruction boundary and wait until all are parked."""
        with self._cond:
            self._pause = True
            self._cond.notify_all()
        self._kick_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked < len(self._active) and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"vCPUs did not pause within {timeout} s")
                self._cond.wait(left)

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def _kick_all(self) -> None:
        self.console.interrupt()
        can_signal = signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)
        with self._kick_lock:
            for vcpu in self.vcpus:
                vcpu.request_exit(True)
                ident = self._kickable.get(vcpu.id)
                if ident is not None and can_signal:
                    signal.pthread_kill(ident, KICK_SIGNAL)

    def _cancelled(self) -> bool:
        return self._stop or self._pause

    def _vcpu_main(self, vcpu: Vcpu) -> None:
        with self._kick_lock:
            self._kickable[vcpu.id] = threading.get_ident()
        try:
            self._run_loop(vcpu)
        except _Stopped:
            pass
        except BaseException as e:  # any failure ends the whole machine, reported by wait()
            with self._cond:
                if self._error is None:
                    self._error = e
            self.stop()
        finally:
            with self._kick_lock:
                del self._kickable[vcpu.id]
            with self._cond:
                self._active.discard(vcpu.id)
                self._release_barrier()
                if not self._active:
                    self._t1 = time.monotonic()
                self._cond.notify_all()

    def _run_loop(self, vcpu: Vcpu) -> None:
        while True:
            if self._stop:
                raise _Stopped
            if self._pause:
                self._park(vcpu)
                continue
            ex = vcpu.run()
            self._count(ex)
            match ex:
                case IoOut():
                    self._io_out(vcpu, ex)
                case IoIn():
                    vcpu.set_io_in_data(self._io_in(vcpu, ex))
                case Interrupted():
                    vcpu.request_exit(False)  # the loop top re-checks stop/pause
                case _:
                    raise self._fault(vcpu, ex)

    def _park(self, vcpu: Vcpu) -> None:
        vcpu.complete_pending_io()
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self._pause and not self._stop:
                self._cond.wait()
            self._parked -= 1

    def _count(self, ex: Exit) -> None:
        key = type(ex).__name__
        if isinstance(ex, IoOut | IoIn):
            try:
                key += f":{Port(ex.port).name}"
            except ValueError:
                key += f":0x{ex.port:x}"
        with self._cond:
            self._exits[key] += 1

    # --- the guest ABI -----------------------------------------------------------------

    def _read_buf(self, vcpu: Vcpu, address: int, what: str) -> tuple[int, int]:
        if not self.memory.contains(address, abi.BUF.size):
            raise self._fault(vcpu, None, f"passed a {what} buffer descriptor at "
                                          f"0x{address:x}, outside guest RAM")
        addr, length, _ = abi.BUF.unpack(self.memory.read(address, abi.BUF.size))
        if not self.memory.contains(addr, length):
            raise self._fault(vcpu, None, f"passed a {what} buffer 0x{addr:x}+0x{length:x} "
                                          "outside guest RAM")
        return addr, length

    def _io_out(self, vcpu: Vcpu, ex: IoOut) -> None:
        value = int.from_bytes(ex.data[: ex.size], "little")
        match ex.port:
            case Port.PUTC:
                self.console.write(ex.data[:1])
            case Port.WRITE:
                addr, length = self._read_buf(vcpu, value, "console write")
                self.console.write(self.memory.read(addr, length))
            case Port.READ:
                addr, length = self._read_buf(vcpu, value, "console read")
                line = self.console.take_line(length, self._cancelled)
                if line is not None:
                    self.memory.write(addr, line)
                result = abi.RETRY if line is None else len(line)
                self.memory.write(value + 16, struct.pack("<q", result))
            case Port.READY:
                with self._cond:
                    if self._ready_at is None:
                        self._ready_at = time.monotonic()
                self.ready.set()
                if self.pause_on_ready:
                    with self._cond:
                        self._pause = True
                    self._kick_all()
            case Port.EXIT:
                with self._cond:
                    if self._status is None:
                        self._status = value
                self.stop()
                raise _Stopped
            case Port.STOP:
                raise _Stopped
            case _:
                raise self._fault(vcpu, None, f"wrote to port 0x{ex.port:x}, which is not "
                                              "part of the pagein guest ABI")

    def _io_in(self, vcpu: Vcpu, ex: IoIn) -> bytes:
        if ex.port == Port.BARRIER:
            passed = self._barrier(vcpu.id)
            return struct.pack("<i", 0 if passed else abi.RETRY)[: ex.size]
        raise self._fault(vcpu, None, f"read from port 0x{ex.port:x}, which is not part of "
                                      "the pagein guest ABI")

    def _barrier(self, vcpu_id: int) -> bool:
        with self._cond:
            gen = self._barrier_gen
            self._barrier_arrived.add(vcpu_id)
            self._release_barrier()
            while self._barrier_gen == gen:
                if self._cancelled():
                    self._barrier_arrived.discard(vcpu_id)
                    return False
                self._cond.wait()
            return True

    def _release_barrier(self) -> None:
        # Called with self._cond held; vCPUs that stopped no longer count.
        if self._barrier_arrived and self._barrier_arrived >= self._active:
            self._barrier_arrived.clear()
            self._barrier_gen += 1
            self._cond.notify_all()

    # --- errors ------------------------------------------------------------------------

    def _fault(self, vcpu: Vcpu, ex: Exit | None, what: str = "") -> GuestFault:
        regs: Regs | None = None
        sregs: Sregs | None = None
        # The vCPU may be unusable; the report must go out even without its registers.
        with contextlib.suppress(PageinError):
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        where = _describe(regs, sregs)
        if ex is None:
            msg = f"vCPU {vcpu.id} {what} ({where})"
        elif isinstance(ex, Shutdown):
            hint = "" if sregs is None else _cr2_hint(sregs.cr2, self.memory.end)
            msg = (f"vCPU {vcpu.id} triple-faulted: the guest raised an exception and there "
                   f"is no IDT to handle it ({where}{hint})")
        elif isinstance(ex, InternalError) and ex.suberror == _EMULATION:
            msg = (f"vCPU {vcpu.id} hit a KVM emulation failure ({where}): privileged guest "
                   "code cannot run on this KVM (kvm_pvm emulates CPL 0 and its emulator "
                   "lacks this instruction); run the workload at CPL 3")
        elif isinstance(ex, InternalError):
            msg = f"vCPU {vcpu.id} stopped with KVM internal error {ex.suberror} ({where})"
        elif isinstance(ex, FailEntry):
            msg = (f"KVM refused to enter vCPU {vcpu.id} (hardware reason "
                   f"0x{ex.hardware_reason:x}): its initial register state is invalid "
                   f"({where})")
        elif isinstance(ex, Mmio):
            msg = (f"vCPU {vcpu.id} accessed guest-physical 0x{ex.address:x}, outside guest "
                   f"RAM ({where})")
        elif isinstance(ex, Hlt):
            msg = f"vCPU {vcpu.id} executed HLT, which the pagein ABI does not use ({where})"
        else:
            msg = f"vCPU {vcpu.id} stopped with an unexpected exit {ex!r} ({where})"
        return GuestFault(msg, vcpu.id, regs, sregs)

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPUs and release every fd (and the memory if the machine made it)."""
        if self._threads:
            self.stop()
            for t in self._threads:
                t.join(5.0)
        for vcpu in self.vcpus:
            vcpu.close()
        if self.dirty is not None:
            self.dirty.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        self.kvm.close()
        if self._own_memory:
            self.memory.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _install_kick_handler() -> None:
    # Python installs signal handlers only from the main thread; elsewhere a kick falls
    # back to immediate_exit alone, which a guest spinning without exits never sees.
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def _describe(regs: Regs | None, sregs: Sregs | None) -> str:
    if regs is None or sregs is None:
        return "registers unavailable"
    return (f"rip=0x{regs.rip:x} rsp=0x{regs.rsp:x} cr2=0x{sregs.cr2:x} "
            f"rflags=0x{regs.rflags:x} cs=0x{sregs.cs.selector:x} rax=0x{regs.rax:x} "
            f"rbx=0x{regs.rbx:x} rcx=0x{regs.rcx:x} rdx=0x{regs.rdx:x} rsi=0x{regs.rsi:x} "
            f"rdi=0x{regs.rdi:x}")


def _cr2_hint(cr2: int, mem_end: int) -> str:
    # CR2 holds the address of the last page fault; it is stale after other exceptions.
    if cr2 >= mem_end:
        return f"; cr2 is beyond guest RAM (0x{mem_end:x} bytes)"
    if cr2 < layout.LARGE_PAGE:
        return "; cr2 is in the VMM's supervisor-only first 2 MiB (a NULL dereference?)"
    if cr2 < layout.IMAGE_BASE:
        return "; cr2 is in the read-only parameter page"
    return ""
