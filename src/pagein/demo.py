"""The self-contained demos behind ``pagein demo``.

The main one (:func:`run_vm_demo`) is the job pagein exists for: boot the built-in
``function`` guest on KVM, snapshot it when it says READY, restore the snapshot with
each backend (copy, file mapping, userfaultfd with each strategy), check that every
restored guest answers exactly as the original did after the snapshot point, and
measure resume latency, time to the first answer, time to an answer that touches all
of the guest's state, and guest memory present. Then a few clones at once through one
handler, private and with ``--share-pages``, and the host memory each way takes
(:func:`measure_clones`).

``pagein demo --memory-only`` (:func:`run_demo`) needs no KVM: it writes a snapshot
file of a memory region with known content, then restores it two ways and verifies
every byte of each:

- eager: ``read()`` the whole file into fresh anonymous memory, then use it;
- lazy: map empty memory, register it with userfaultfd and let a pagein handler in a
  separate process fill each page on first touch (:func:`pagein.serve.local.restore_lazily`),
  with each restore strategy (one page per fault, a readahead window, or everything
  populated in the background while faults jump the queue).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagein.errors import GuestError, IntegrityError
from pagein.serve.handler import HandlerProcess
from pagein.serve.local import restore_lazily
from pagein.serve.strategies import StrategyName
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.smaps import pss_bytes
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class RestoreRun:
    """One restore method's measurements (seconds from the start of the restore)."""

    method: str
    pages: int
    faults: int
    ready_s: float        # memory usable: eager after the copy, lazy after the handshake
    first_byte_s: float   # first byte read
    tenth_s: float        # a random 10% of the pages read
    total_s: float        # every page read
    verified_bytes: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    size_bytes: int
    runs: tuple[RestoreRun, ...]


def page_content(index: int) -> bytes:
    """The known content of page ``index``: a hash chain, different on every page.

    Every 8th page is left all zeros, as untouched guest memory is in real snapshots.
    """
    if index % 8 == 7:
        return bytes(PAGE_SIZE)
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    return seed * (PAGE_SIZE // len(seed))


def write_snapshot(path: str, size_bytes: int) -> None:
    """Write ``size_bytes`` of known page content to ``path`` (zero pages as holes)."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for index in range(size_bytes // PAGE_SIZE):
            data = page_content(index)
            if any(data):
                f.seek(index * PAGE_SIZE)
                f.write(data)


def _verify(read: Callable[[int, int], bytes], size_bytes: int, path: str) -> int:
    """Compare restored memory with the snapshot file chunk by chunk; return bytes checked."""
    with open(path, "rb") as f:
        for off in range(0, size_bytes, _CHUNK):
            want = f.read(min(_CHUNK, size_bytes - off))
            if read(off, len(want)) != want:
                raise IntegrityError(
                    f"restored memory differs from {path} in bytes 0x{off:x}-0x{off + len(want):x}")
    return size_bytes


def _touch_order(pages: int) -> list[int]:
    """A fixed random 10% of the pages first, then every page in order."""
    rng = random.Random(1234)
    return rng.sample(range(pages), max(1, pages // 10))


def _timed_touches(read: Callable[[int, int], bytes], size_bytes: int,
                   start: float) -> tuple[float, float, float]:
    """Read one byte, then a random tenth of the pages, then all; return the three times."""
    read(0, 1)
    first = time.perf_counter() - start
    for page in _touch_order(size_bytes // PAGE_SIZE):
        read(page * PAGE_SIZE, 1)
    tenth = time.perf_counter() - start
    for off in range(0, size_bytes, PAGE_SIZE):
        read(off, 1)
    return first, tenth, time.perf_counter() - start


def eager_restore(path: str, size_bytes: int) -> RestoreRun:
    """Read the whole snapshot into fresh memory, then touch and verify it."""
    start = time.perf_counter()
    with Mapping.anonymous(size_bytes) as mem, open(path, "rb", buffering=0) as f:
        view = mem.view()
        done = 0
        while done < size_bytes:
            n = f.readinto(view[done:])
            if not n:
                raise IntegrityError(f"{path} ended after {done} of {size_bytes} bytes")
            done += n
        del view
        ready = time.perf_counter() - start
        first, tenth, total = _timed_touches(mem.read, size_bytes, start)
        checked = _verify(mem.read, size_bytes, path)
    return RestoreRun("eager read()", size_bytes // PAGE_SIZE, 0, ready, first, tenth, total,
                      checked)


def lazy_restore(path: str, size_bytes: int, strategy: StrategyName) -> RestoreRun:
    """Restore through a pagein handler process; touch every page; verify every byte.

    The clock starts once the handler process is up (in a fleet it is a daemon that
    is already running when a VM restores); its start-up is not counted.
    """
    with restore_lazily(path, strategy=strategy) as restore:
        start = time.perf_counter()
        mem = restore.mapping
        first, tenth, total = _timed_touches(mem.read, size_bytes, start)
        checked = _verify(mem.read, size_bytes, path)
        faults = restore.stats().faults
    return RestoreRun(f"lazy, {strategy.value}", size_bytes // PAGE_SIZE, faults, 0.0, first,
                      tenth, total, checked)


DEMO_STRATEGIES = (StrategyName.ON_DEMAND, StrategyName.READAHEAD, StrategyName.POPULATE_ALL)


def check_demo_size(size_bytes: int) -> None:
    """Raise ValueError unless ``size_bytes`` is a positive multiple of the page size."""
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise ValueError(f"demo size {size_bytes} must be a positive multiple of {PAGE_SIZE}")


def run_demo(size_bytes: int = 256 << 20, workdir: str | None = None,
             strategies: tuple[StrategyName, ...] = DEMO_STRATEGIES) -> DemoResult:
    """Write a snapshot of ``size_bytes``, restore it eagerly and lazily, verify each."""
    check_demo_size(size_bytes)
    with tempfile.TemporaryDirectory(prefix="pagein-demo-", dir=workdir) as tmp:
        path = os.path.join(tmp, "memory.snap")
        write_snapshot(path, size_bytes)
        runs = [eager_restore(path, size_bytes)]
        runs += [lazy_restore(path, size_bytes, s) for s in strategies]
    return DemoResult(size_bytes, tuple(runs))


# --- the VM demo -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmRestoreRun:
    """One restore of the VM snapshot (seconds from the start of the restore call)."""

    method: str
    resume_s: float       # vCPUs running again
    first_answer_s: float  # answer to a request that reads a few pages
    all_state_s: float    # answer to a request that reads every state page
    present_bytes: int    # guest memory mapped in the VMM after both answers
    answers_match: bool   # equal to the original guest's answers after the snapshot


@dataclass(frozen=True, slots=True)
class VmDemoResult:
    state_bytes: int
    mem_bytes: int
    vcpus: int
    ready_s: float        # boot to READY of the original guest
    snapshot_s: float     # pause + save of state and memory
    requests: tuple[str, str]
    answers: tuple[str, str]
    runs: tuple[VmRestoreRun, ...]
    clones: tuple[CloneRun, ...] = ()


@dataclass(frozen=True, slots=True)
class VmMethod:
    """A way to restore: a backend, and for uffd a strategy."""

    backend: Backend
    strategy: StrategyName = StrategyName.ON_DEMAND
    record: bool = False  # write the guest's working set (DIR/working-set) when it goes

    @property
    def label(self) -> str:
        if self.backend is Backend.UFFD:
            return f"uffd, {self.strategy.value}{' + record' if self.record else ''}"
        return {Backend.COPY: "copy (read all first)",
                Backend.FILE: "file (MAP_PRIVATE)"}[self.backend]


#: Clones restored at once for the demo's sharing table (each way).
DEMO_CLONES = 3

VM_METHODS = (VmMethod(Backend.COPY), VmMethod(Backend.FILE),
              VmMethod(Backend.UFFD, StrategyName.ON_DEMAND, record=True),
              VmMethod(Backend.UFFD, StrategyName.READAHEAD),
              VmMethod(Backend.UFFD, StrategyName.POPULATE_ALL),
              # Prefetches what the recording restore above wrote (it must come after it).
              VmMethod(Backend.UFFD, StrategyName.WORKING_SET))


@dataclass(frozen=True, slots=True)
class CloneRun:
    """N clones of the snapshot alive at once, each having read all its state."""

    method: str
    clones: int
    host_bytes: int  # Pss of every mapping of their guest RAM (clones' and server's)
    answers_match: bool


def measure_clones(directory: str, clones: int, request: str, answer: str,
                   timeout: float = 300.0) -> tuple[CloneRun, CloneRun]:
    """Restore ``clones`` clones through one ``pagein serve``, privately, then with
    ``--share-pages``; each answers ``request`` (the checksum: all its state) and they
    stay alive until the host memory of all of them is counted."""
    return (_clones(directory, clones, False, request, answer, timeout),
            _clones(directory, clones, True, request, answer, timeout))


def _clones(directory: str, n: int, share: bool, request: str, answer: str,
            timeout: float) -> CloneRun:
    workdir = tempfile.mkdtemp(prefix="pagein-demo-clones-")
    vms: list[RestoredVm] = []
    handler = None
    try:
        serve = HandlerProcess.options_for_one_vm(os.path.join(directory, "memory"),
                                                  workdir).with_(exit_after=None)
        handler = HandlerProcess.start(serve, workdir, timeout)
        opts = RestoreOptions(uffd_socket=handler.socket_path, share_pages=share)
        ok = True
        for _ in range(n):
            vm = restore(directory, opts)
            vms.append(vm)
            vm.machine.console.send(request + "\n")
            ok = vm.machine.console.read_line(timeout) == answer and ok
        starts = {m.address for vm in vms for m in vm.mappings}
        host = pss_bytes("self", lambda a, _p: a in starts) + pss_bytes(
            handler.pid, lambda _a, path: path.startswith("/memfd:pagein-cache"))
    finally:
        for vm in vms:
            vm.close()
        if handler is not None:
            handler.stop(timeout)
        shutil.rmtree(workdir, ignore_errors=True)
    label = "uffd --share-pages" if share else "uffd (private)"
    return CloneRun(label, n, host, ok)


def snapshot_function_guest(directory: str, state_bytes: int, mem_bytes: int, vcpus: int,
                            requests: tuple[str, ...], seed: int = 1,
                            timeout: float = 300.0) -> tuple[float, float, tuple[str, ...]]:
    """Boot ``function``, snapshot it at READY into ``directory``, then ask the original
    ``requests``; return (ready seconds, snapshot seconds, its answers)."""
    wa = function_args(state_bytes, seed)
    with Machine.create(mem_bytes, vcpus) as m:
        m.pause_on_ready = True
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        t0 = time.perf_counter()
        m.start()
        if not m.ready.wait(timeout):
            raise GuestError(f"the function guest was not ready within {timeout:g} s")
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        m.pause()
        save_snapshot(m, directory, workload=("function", wa.args), digest=False)
        snap_s = time.perf_counter() - t1
        m.resume()
        answers = []
        for r in requests:
            m.console.send(r + "\n")
            answers.append(m.console.read_line(timeout))
        m.console.close_input()
        m.wait(timeout)
    return ready, snap_s, tuple(answers)


def measure_restore(directory: str, method: VmMethod, requests: tuple[str, str],
                    answers: tuple[str, str], timeout: float = 300.0) -> VmRestoreRun:
    """Restore ``directory`` with ``method`` and time the two requests.

    A uffd restore hands its memory to a ``pagein serve`` that is already listening
    (started before the clock, as a fleet's handler daemon is).
    """
    workdir = tempfile.mkdtemp(prefix="pagein-demo-serve-")
    handler = None
    ws = os.path.join(directory, "working-set")
    try:
        opts = RestoreOptions(backend=method.backend, strategy=method.strategy)
        if method.backend is Backend.UFFD:
            uses_ws = method.strategy in (StrategyName.WORKING_SET, StrategyName.REAP)
            serve = HandlerProcess.options_for_one_vm(
                os.path.join(directory, "memory"), workdir, strategy=method.strategy,
                working_set=ws if uses_ws else None, record=ws if method.record else None)
            handler = HandlerProcess.start(serve, workdir, timeout)
            opts = RestoreOptions(backend=method.backend, strategy=method.strategy,
                                  uffd_socket=handler.socket_path)
        start = time.perf_counter()
        with restore(directory, opts) as vm:
            resumed = time.perf_counter() - start
            times, got = [], []
            for r in requests:
                vm.machine.console.send(r + "\n")
                got.append(vm.machine.console.read_line(timeout))
                times.append(time.perf_counter() - start)
            present = vm.pages_present() * PAGE_SIZE
            vm.machine.console.close_input()
            vm.wait(timeout)
    finally:
        if handler is not None:
            # The handler serves one VM and exits once it has gone, after writing a
            # recorded working set: let it finish rather than cut the write short.
            handler.stop(timeout, grace=10.0)
        shutil.rmtree(workdir, ignore_errors=True)
    return VmRestoreRun(method.label, resumed, times[0], times[1], present,
                        tuple(got) == answers)


def run_vm_demo(state_bytes: int = 128 << 20, mem_bytes: int = 256 << 20, vcpus: int = 2,
                methods: tuple[VmMethod, ...] = VM_METHODS,
                workdir: str | None = None) -> VmDemoResult:
    """Snapshot a ``function`` guest at READY and restore it with each method.

    Raises :class:`~pagein.errors.IntegrityError` if the original guest's answers differ
    from the numpy reference (the restored guests' are reported per run).
    """
    ref = FunctionReference(state_bytes, 1, vcpus)
    requests = (f"get {ref.key(ref.records // 3)}", "checksum")
    with tempfile.TemporaryDirectory(prefix="pagein-demo-vm-", dir=workdir) as tmp:
        ready, snap_s, answers = snapshot_function_guest(tmp, state_bytes, mem_bytes, vcpus,
                                                         requests)
        want = (ref.answer(requests[0]), ref.answer(requests[1]))
        if answers != want:
            raise IntegrityError(f"the original guest answered {answers}, the reference "
                                 f"says {want}")
        runs = tuple(measure_restore(tmp, m, requests, want) for m in methods)
        clones = measure_clones(tmp, DEMO_CLONES, requests[1], want[1]) if DEMO_CLONES else ()
    return VmDemoResult(state_bytes, mem_bytes, vcpus, ready, snap_s, requests, want, runs,
                        clones)
