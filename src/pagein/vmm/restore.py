"""Restore a VM snapshot: guest memory by copy, by file mapping, or lazily by userfaultfd.

:func:`restore` loads and checks the snapshot (:mod:`pagein.vmm.snapshot`) before any
guest runs, builds guest memory with one of three backends, puts the vCPU and console
state back and starts the vCPUs that were running:

``copy``
    fresh anonymous memory, the memory file's data extents read into it first (holes
    are already zero). Resume costs a read of every byte of data.
``file``
    the memory file mapped ``MAP_PRIVATE`` (Firecracker's default): the kernel fills
    each page from the page cache on first touch and copies it on first write.
``uffd``
    anonymous ``MAP_PRIVATE|MAP_NORESERVE`` memory registered in MISSING mode with a
    uffd that requires ``UFFD_FEATURE_EVENT_REMOVE``, handed over Firecracker's protocol
    (:func:`pagein.serve.firecracker.connect_and_send`) to a ``pagein serve`` at
    ``uffd_socket``, or to one spawned for this VM with any restore strategy.

``shared_memory`` puts guest memory in a memfd (:attr:`RestoredVm.memfd`) that another
process can map too. ``copy`` fills it in place; ``uffd`` registers the shared mapping
itself (``UFFD_FEATURE_MISSING_SHMEM``) and ``UFFDIO_COPY`` fills the memfd's page cache,
so the mapping is never replaced and every mapper sees the restored pages. ``file``
cannot share: a private file mapping is what breaks sharing.

Failure is loud: this process keeps its own copy of the uffd for as long as guest
memory is mapped, so a guest whose handler died blocks on its next missing page and
never reads a zero page. A watchdog sees the handler's socket close, stops the guest,
logs an error and makes :meth:`RestoredVm.wait` raise :class:`~pagein.errors.HandlerError`
at once. A vCPU already waiting on a page stays blocked in the kernel (KVM reads guest
page tables with ``copy_from_user``, which only the page or a fatal signal ends), so
:meth:`RestoredVm.close` serves those pages itself from the snapshot to let the stopped
vCPUs leave; should that fail, it leaves that VM's memory and uffd in place until the
process exits rather than crash it or let the range fall back to zero pages.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import numpy as np

from pagein.errors import HandlerError, SnapshotFormatError, Unavailable
from pagein.serve.firecracker import Region as WireRegion
from pagein.serve.firecracker import connect_and_send
from pagein.serve.handler import HandlerProcess
from pagein.serve.identity import Identity
from pagein.serve.pagecache import request_page_cache
from pagein.serve.session import Session
from pagein.serve.state import VmState
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, OnDemand, StrategyName
from pagein.snapshot.chain import file_sha256
from pagein.snapshot.raw import RawFileSource, data_extents
from pagein.sys.mapping import (
    HUGE_PAGE_SIZE,
    Advice,
    Mapping,
    Memfd,
    hugetlb_pool_hint,
)
from pagein.sys.pagemap import Pagemap
from pagein.sys.poll import wait_readable
from pagein.sys.thp import anon_huge_bytes
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd
from pagein.vmm.console import Console
from pagein.vmm.hugepages import UFFD_SPARE_PAGES, check_hugetlb_pool
from pagein.vmm.layers import chain_of, copy_chain, map_chain_private, verify_chain
from pagein.vmm.machine import Machine, RunResult
from pagein.vmm.memory import GuestMemory, Region
from pagein.vmm.snapshot import Snapshot, load_snapshot, verify_memory

__all__ = ["Backend", "RestoreOptions", "RestoredVm", "restore"]

log = logging.getLogger("pagein.vmm")
_PRESENT = np.uint64(1 << 63)


class Backend(enum.Enum):
    """How guest memory comes back."""

    COPY = "copy"
    FILE = "file"
    UFFD = "uffd"


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """``uffd_socket``: an already running ``pagein serve --socket`` (None: spawn one).

    ``trust_uids``: uids besides root and our own that may serve ``uffd_socket`` (the
    handler receives write access to the guest's memory; any other listener is refused
    before the uffd is sent).

    ``check_identity``: send the snapshot's size and SHA-256 with the handshake and
    wait for the handler to confirm it serves that snapshot (pagein's extension, see
    :mod:`pagein.serve.identity`); False for a handler that does not know it.

    ``working_set`` / ``record``: passed to the spawned handler (``--working-set`` for the
    working-set and reap strategies, ``--record`` to write this VM's working set).

    ``collapse`` (uffd only): whether the handler collapses each wholly filled 2 MiB range
    of guest memory into a huge page (docs/serve.md, "Huge pages after a lazy restore"):
    None leaves it to the handler's default; True or False is passed to a spawned
    handler, and False also marks guest memory ``MADV_NOHUGEPAGE``, which a running
    ``pagein serve`` (``uffd_socket``) honours and the kernel enforces.

    ``share_pages`` (uffd only): guest memory is a private mapping of the handler's page
    cache of the snapshot, so clones restored through one ``pagein serve`` share their
    clean pages (see docs/serve.md, "Clones share pages").
    """

    backend: Backend = Backend.UFFD
    strategy: StrategyName = StrategyName.ON_DEMAND
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES
    uffd_socket: str | None = None
    shared_memory: bool = False
    verify_memory: bool = False
    handler_timeout: float = 30.0
    working_set: str | None = None
    record: str | None = None
    trust_uids: tuple[int, ...] = ()
    # Log the pages the guest and the VMM write, so the VM can be diff-snapshotted on the
    # snapshot it was restored from (costs a write fault per page after each snapshot).
    track_dirty: bool = True
    check_identity: bool = True
    share_pages: bool = False
    collapse: bool | None = None


@dataclass(slots=True)
class _Parts:
    """What a restore owns, closed in reverse order of need."""

    mappings: list[Mapping] = field(default_factory=list)
    memfd: Memfd | None = None
    uffd: Userfaultfd | None = None
    sock: socket.socket | None = None
    handler: HandlerProcess | None = None
    workdir: str | None = None
    socket_path: str | None = None  # the handler's (uffd restores)

    def close(self, *, unmap: bool = True) -> None:
        # Unmap before the uffd goes: once the range is gone nothing can fault, so no
        # access can fall back to the zero pages an unserved registered range gives.
        if unmap:
            for m in self.mappings:
                m.close()
            if self.uffd is not None:
                self.uffd.close()
            if self.memfd is not None:
                self.memfd.close()
        if self.sock is not None:
            self.sock.close()
        if self.handler is not None:
            self.handler.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RestoredVm:
    """A running restored VM. Use as a context manager; :meth:`wait` for its end."""

    def __init__(self, machine: Machine, snapshot: Snapshot, options: RestoreOptions,
                 parts: _Parts, resume_seconds: float) -> None:
        self.machine = machine
        self.snapshot = snapshot
        self.options = options
        self.resume_seconds = resume_seconds
        self._parts = parts
        self._error: HandlerError | None = None
        self._closed = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        # Set when the vCPU threads have all ended, or when the handler died: a vCPU
        # waiting on a page inside the kernel (KVM walking the guest's page tables with
        # copy_from_user) can only be woken by the page or a fatal signal, so waiting
        # for its thread would hang.
        self._done = threading.Event()
        self._joined = threading.Event()
        self._outcome: RunResult | BaseException | None = None
        threading.Thread(target=self._join, daemon=True, name="pagein-restore-wait").start()
        self._watchdog: threading.Thread | None = None
        if parts.sock is not None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name="pagein-restore-watchdog")
            self._watchdog.start()

    @property
    def memfd(self) -> Memfd | None:
        """The shared guest memory (``shared_memory=True``), for another process to map."""
        return self._parts.memfd

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._parts.mappings)

    @property
    def handler_socket(self) -> str | None:
        """The uffd handler's socket (uffd restores): where a peer that maps
        :attr:`memfd` hands its own uffd (:func:`pagein.vmm.peer.map_guest_memory`)."""
        return self._parts.socket_path

    @property
    def handler_pid(self) -> int | None:
        """The spawned handler's pid (None with a copy/file restore or an external one)."""
        return None if self._parts.handler is None else self._parts.handler.pid

    def _watch(self) -> None:
        sock = self._parts.sock
        assert sock is not None
        while True:
            ready = wait_readable([sock.fileno(), self._stop_r], None)
            if self._stop_r in ready:
                return
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
        pid = self.handler_pid
        who = f"the pagein handler (pid {pid})" if pid else \
            f"the pagein handler at {self.options.uffd_socket}"
        self._error = HandlerError(
            f"{who} for {self.snapshot.memory_path} went away while the guest depended on "
            "it: the guest is stopped (a vCPU waiting on a missing page stays blocked) and "
            "never read a zero page in place of one not yet served")
        log.error("%s", self._error)
        self.machine.stop()
        self._done.set()

    def _join(self) -> None:
        try:
            self._outcome = self.machine.wait()
        except BaseException as e:  # reported by wait()
            self._outcome = e
        self._joined.set()
        self._done.set()

    def check(self) -> None:
        """Raise :class:`HandlerError` if the handler went away."""
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the guest to end and return how it ended.

        Raises :class:`HandlerError` as soon as the handler is gone (vCPUs waiting on a
        page it never served stay blocked: they never see a zero page), the guest's
        own error, or ``TimeoutError`` (the machine is then stopped).
        """
        if not self._done.wait(timeout):
            self.machine.stop()
            raise TimeoutError(f"the restored guest did not finish within {timeout} s")
        self.check()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None  # _done is set only after an outcome or an error
        return self._outcome

    def huge_bytes(self) -> int:
        """Bytes of guest memory mapped by transparent huge pages now (``AnonHugePages``
        of its mappings in ``/proc/self/smaps``)."""
        return sum(anon_huge_bytes(os.getpid(), m.address, m.end) for m in self._parts.mappings)

    def pages_present(self) -> int:
        """Guest memory pages mapped in this process now (``/proc/self/pagemap``)."""
        with Pagemap() as pm:
            return sum(int(np.count_nonzero(
                np.frombuffer(pm.entries(m.address, m.length), dtype=np.uint64) & _PRESENT))
                for m in self._parts.mappings)

    def close(self) -> None:
        """Stop the guest and release its memory, the uffd and the handler (idempotent)."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        self.machine.stop()
        # vCPU threads still running now are blocked on pages their dead handler never
        # served: unmapping under them would crash the process and closing the uffd would
        # hand them zero pages. Serve those pages from the snapshot ourselves so they see
        # the stop; if that fails, their machine and memory are left as they are.
        if not self._joined.wait(1.0 if self._error is not None else 5.0) and \
                not self._unblock():
            log.error("vCPUs %s of the VM restored from %s are blocked on pages nobody "
                      "serves: its memory and uffd stay in place until the process exits",
                      sorted(self.machine.active_vcpus), self.snapshot.directory)
            self._parts.close(unmap=False)
            return
        self.machine.close()
        if self._watchdog is not None:
            self._watchdog.join(5)
        self._parts.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _unblock(self, timeout: float = 10.0) -> bool:
        """Fill, from the snapshot, the pages stopped vCPUs wait on; True once they ended.

        Their faults were read by the dead handler, so first wake every waiter: each
        retries its access and faults again, now to this process's uffd. The machine is
        stopped and the kick signal pending, so a vCPU leaves KVM_RUN once its page is
        in; it only ever sees snapshot content.

        Safety: fills guest memory with ``UFFDIO_COPY`` from a read-only mapping of the
        memory file; only pages of the registered mappings are filled.
        """
        uffd = self._parts.uffd
        if uffd is None or self._error is None:
            return False
        log.warning("serving the pages blocked vCPUs wait on from %s so they can stop",
                    self.snapshot.memory_path)
        wire = [WireRegion(m.address, r.size, r.offset, r.page_size)
                for m, r in zip(self._parts.mappings, self.snapshot.regions, strict=True)]
        for w in wire:
            uffd.wake(w.base_address, w.size_bytes)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        # The same fault engine pagein serve runs, in a thread of this process: vCPUs
        # fault inside KVM_RUN without the GIL, so a thread here can serve them.
        try:
            with RawFileSource(self.snapshot.memory_path) as source, \
                    VmState.create(wire) as state:
                session = Session(uffd=uffd, sock=None, regions=wire, source=source,
                                  strategy=OnDemand(), state=state, stop_fd=stop_r,
                                  name=f"stopping {self.snapshot.memory_path}")
                t = threading.Thread(target=session.run, daemon=True, name="pagein-unblock")
                t.start()
                self._joined.wait(timeout)
                os.write(stop_w, b"x")
                t.join()
                session.close()
        finally:
            os.close(stop_r)
            os.close(stop_w)
        return self._joined.is_set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- guest memory per backend ------------------------------------------------------------


def _fresh(snap: Snapshot, parts: _Parts, shared: bool) -> list[Region]:
    """Empty memory for every region: anonymous private, or one memfd in file layout."""
    if shared:
        if any(r.page_size != snap.regions[0].page_size for r in snap.regions):
            raise SnapshotFormatError(f"snapshot {snap.directory} mixes page sizes: it cannot "
                                      "be restored into one shared memfd")
        parts.memfd = Memfd.create("pagein-guest", snap.memory_bytes,
                                   hugetlb=snap.regions[0].page_size == HUGE_PAGE_SIZE)
    out = []
    for r in snap.regions:
        if parts.memfd is not None:
            m = parts.memfd.map(offset=r.offset, length=r.size)
        else:
            m = Mapping.anonymous(r.size, hugetlb=r.page_size == HUGE_PAGE_SIZE)
        parts.mappings.append(m)
        out.append(Region(r.guest_phys, m))
    return out


def _check_pool(snap: Snapshot, opts: RestoreOptions) -> None:
    """Refuse, before any guest memory exists, a restore of 2 MiB regions the hugetlb pool
    cannot hold (:mod:`pagein.vmm.hugepages`): the memory is mapped MAP_NORESERVE, so the
    shortage would only show as EFAULT in the middle of a copy, or as a fill that fails
    with the guest frozen. ``file`` maps 4 KiB page-cache pages and needs none; a
    ``share_pages`` clone maps the handler's cache, which reserves its pages itself."""
    pages = sum(r.size for r in snap.regions if r.page_size == HUGE_PAGE_SIZE) // HUGE_PAGE_SIZE
    if opts.backend is Backend.COPY:
        check_hugetlb_pool(f"restoring snapshot {snap.directory} by copy", pages)
    elif opts.backend is Backend.UFFD and not opts.share_pages:
        check_hugetlb_pool(f"restoring snapshot {snap.directory} through userfaultfd", pages,
                           spare=UFFD_SPARE_PAGES)


def _copy_in(snap: Snapshot, regions: list[Region]) -> None:
    """Read the memory file's data extents into fresh memory (holes stay zero)."""
    fd = os.open(snap.memory_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = data_extents(fd, snap.memory_bytes)
        for stored, region in zip(snap.regions, regions, strict=True):
            view = region.mapping.view()
            try:
                for off, length in extents:
                    a, b = max(off, stored.offset), min(off + length, stored.offset + stored.size)
                    while a < b:
                        n = _read_into(fd, view[a - stored.offset: b - stored.offset], a,
                                       stored.page_size)
                        if n <= 0:
                            raise SnapshotFormatError(
                                f"snapshot memory file {snap.memory_path} ended at byte {a}")
                        a += n
            finally:
                view.release()
    finally:
        os.close(fd)


def _read_into(fd: int, view: memoryview, offset: int, page_size: int) -> int:
    """``preadv`` into guest memory; EFAULT on 2 MiB memory means no huge page was free
    when the kernel faulted one in (MAP_NORESERVE reserved none): say that."""
    try:
        return os.preadv(fd, [view], offset)
    except OSError as e:
        if e.errno == errno.EFAULT and page_size == HUGE_PAGE_SIZE:
            raise Unavailable(f"copying the snapshot into 2048 KiB guest memory failed "
                              f"(EFAULT): {hugetlb_pool_hint(page_size)}") from e
        raise


def _map_file(snap: Snapshot, parts: _Parts) -> list[Region]:
    fd = os.open(snap.memory_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = []
        for r in snap.regions:
            # PROT_WRITE on a private mapping of a read-only fd is allowed: writes copy.
            m = Mapping.of_fd(fd, r.size, offset=r.offset, shared=False,
                              hugetlb=r.page_size == HUGE_PAGE_SIZE)
            parts.mappings.append(m)
            out.append(Region(r.guest_phys, m))
        return out
    finally:
        os.close(fd)


def _map_chain(snap: Snapshot, parts: _Parts, whole: Mapping) -> list[Region]:
    """Guest regions inside one copy-on-write mapping of a flattened chain."""
    parts.mappings.append(whole)
    return [Region(r.guest_phys, Mapping(whole.address + r.offset, r.size, owned=False))
            for r in snap.regions]


def _from_cache(snap: Snapshot, opts: RestoreOptions, parts: _Parts,
                path: str) -> list[Region]:
    """Map every region MAP_PRIVATE from the handler's page cache of the snapshot (at its
    file offset); a cache that does not fit the snapshot is refused here, before any
    guest memory exists."""
    sizes = {r.page_size for r in snap.regions}
    if len(sizes) != 1:
        raise SnapshotFormatError(f"snapshot {snap.directory} mixes page sizes: its regions "
                                  "cannot share one page cache")
    cached = request_page_cache(path, sizes.pop(), need_bytes=snap.memory_bytes,
                                trust_uids=opts.trust_uids)
    with cached.memfd:  # the mappings keep the memfd alive
        out = []
        for r in snap.regions:
            # NORESERVE: a private hugetlbfs mapping would reserve a page per page of it.
            m = cached.memfd.map(shared=False, offset=r.offset, length=r.size,
                                 noreserve=True)
            parts.mappings.append(m)
            out.append(Region(r.guest_phys, m))
    return out


def _register(snap: Snapshot, opts: RestoreOptions, parts: _Parts,
              layered: bool = False) -> list[Region]:
    """Register fresh memory with a uffd and hand it to a handler, as Firecracker does.

    A ``layered`` snapshot is served from its directory: the handler resolves the chain."""
    path = opts.uffd_socket
    if path is None:
        parts.workdir = tempfile.mkdtemp(prefix="pagein-restore-")
        serve = HandlerProcess.options_for_one_vm(
            snap.directory if layered else snap.memory_path, parts.workdir, strategy=opts.strategy,
            readahead_bytes=opts.readahead_bytes, working_set=opts.working_set,
            record=opts.record,
            **({} if opts.collapse is None else {"collapse": opts.collapse}))
        if opts.shared_memory:
            # Peers that map the memfd hand their uffds to this handler too (vmm.peer):
            # one of them leaving must not stop it; close() does.
            serve = serve.with_(exit_after=None)
        parts.handler = HandlerProcess.start(serve, parts.workdir, opts.handler_timeout)
        path = parts.handler.socket_path
    parts.socket_path = path
    huge = any(r.page_size == HUGE_PAGE_SIZE for r in snap.regions)
    features = Feature.EVENT_REMOVE
    mode = RegisterMode.MISSING
    if opts.share_pages:
        regions = _from_cache(snap, opts, parts, path)
        # MINOR: a page already in the cache faults as MINOR (and must: after a balloon's
        # REMOVE the handler answers zeros, not the cache page); MISSING: one not yet there.
        features |= (Feature.MINOR_HUGETLBFS | Feature.MISSING_HUGETLBFS if huge
                     else Feature.MINOR_SHMEM | Feature.MISSING_SHMEM)
        mode |= RegisterMode.MINOR
    else:
        regions = _fresh(snap, parts, opts.shared_memory)
        if opts.shared_memory:
            features |= Feature.MISSING_SHMEM
        if huge:
            features |= Feature.MISSING_HUGETLBFS
    # THREAD_ID when the kernel has it: a handler's fault trace names the vCPU thread.
    parts.uffd = Userfaultfd.open(features, optional=Feature.THREAD_ID)
    if opts.collapse is False and not opts.share_pages and not huge:
        # Any handler (a running pagein serve reads our smaps) and khugepaged keep off.
        for m in parts.mappings:
            m.madvise(Advice.NOHUGEPAGE)
    for m in parts.mappings:
        parts.uffd.register(m.address, m.length, mode)
    wire = [WireRegion(m.address, r.size, r.offset, r.page_size)
            for m, r in zip(parts.mappings, snap.regions, strict=True)]
    # pagein's identity extension: a handler serving another snapshot says so before
    # a vCPU runs, instead of filling this guest with the other snapshot's pages.
    identity = Identity(snap.memory_bytes, snap.memory_sha256,
                        os.path.abspath(snap.memory_path),
                        snap.layer_sha256) if opts.check_identity else None
    parts.sock = connect_and_send(path, wire, parts.uffd, mem_file=snap.memory_path,
                                  trust_uids=opts.trust_uids, identity=identity,
                                  timeout=opts.handler_timeout)
    return regions


def _check_working_set(snap: Snapshot, opts: RestoreOptions) -> None:
    """Refuse a working-set or reap restore without a working set before spawning the
    handler (which would only fail as it starts, with a message about itself)."""
    needs = opts.strategy in (StrategyName.WORKING_SET, StrategyName.REAP)
    if opts.backend is not Backend.UFFD or opts.uffd_socket is not None or not needs:
        return
    if opts.working_set is None:
        raise SnapshotFormatError(
            f"snapshot {snap.directory} has no working set for --strategy "
            f"{opts.strategy.value}: record one with `pagein vm restore {snap.directory} "
            f"--record {os.path.join(snap.directory, 'working-set')}`, or pass "
            "--working-set FILE")
    if not os.path.isfile(opts.working_set):
        raise SnapshotFormatError(f"working set {opts.working_set} does not exist: record one "
                                  "with --record FILE, or pass another --working-set")


def restore(source: str | Snapshot, options: RestoreOptions | None = None, *,
            console: Console | None = None) -> RestoredVm:
    """Restore the snapshot in directory ``source`` and start its vCPUs.

    Everything that can be checked is checked before a vCPU runs: the state file, the
    memory file's size (and its SHA-256 with ``verify_memory``), the backend choice.
    :attr:`RestoredVm.resume_seconds` is the time from this call to running vCPUs.
    Raises :class:`~pagein.errors.SnapshotFormatError`/``IntegrityError`` for a bad
    snapshot, :class:`~pagein.errors.HandlerError` when a handler cannot be started and
    ``ValueError`` for ``file`` with ``shared_memory``.

    Safety: guest memory stays mapped until :meth:`RestoredVm.close`; with ``uffd`` this
    process holds the uffd until then, so no registered page is ever read as zero.
    """
    t0 = time.perf_counter()
    opts = options or RestoreOptions()
    if opts.backend is Backend.FILE and opts.shared_memory:
        raise ValueError("--backend file maps the memory file MAP_PRIVATE, which another "
                         "process cannot share: use --backend copy or uffd with "
                         "--shared-memory")
    if opts.share_pages and (opts.backend is not Backend.UFFD or opts.shared_memory):
        raise ValueError("--share-pages maps guest memory from pagein serve's page cache: "
                         "it needs --backend uffd and cannot be combined with "
                         "--shared-memory")
    snap = source if isinstance(source, Snapshot) else load_snapshot(source)
    _check_working_set(snap, opts)
    # A diff layer: its whole chain is resolved and checked here, before any guest runs.
    chain = chain_of(snap)
    if opts.verify_memory:
        verify_chain(chain) if chain.depth else verify_memory(snap)
    parts = _Parts()
    machine: Machine | None = None
    try:
        _check_pool(snap, opts)
        if opts.backend is Backend.COPY:
            regions = _fresh(snap, parts, opts.shared_memory)
            if chain.depth:
                copy_chain(chain, snap, [r.mapping for r in regions])
            else:
                _copy_in(snap, regions)
        elif opts.backend is Backend.FILE and chain.depth:
            regions = _map_chain(snap, parts, map_chain_private(chain))
        elif opts.backend is Backend.FILE:
            regions = _map_file(snap, parts)
        else:
            regions = _register(snap, opts, parts, chain.depth > 0)
        machine = Machine(GuestMemory.from_mappings(regions), len(snap.vcpus), console=console)
        if opts.track_dirty:
            machine.enable_dirty_tracking((os.path.realpath(snap.directory),
                                           file_sha256(snap.state_path)))
        machine.set_vcpu_states(list(snap.vcpus))
        machine.console.send(snap.pending_input)
        machine.start(snap.active_vcpus)
    except BaseException:
        if machine is not None:
            machine.close()
        parts.close()
        raise
    return RestoredVm(machine, snap, opts, parts, time.perf_counter() - t0)
