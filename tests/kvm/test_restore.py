"""Restore a `function` guest from a snapshot with every backend, on the real /dev/kvm.

Every test compares the restored guest's answers with the answers the original guest
gave to the same requests after the snapshot point, and both with the numpy reference.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _guest import park_function_at_ready, ready_serve

from pagein.errors import HandlerError
from pagein.serve.strategies import StrategyName
from pagein.vmm.layout import HEAP_START
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore
from pagein.vmm.snapshot import load_snapshot, save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
STATE, MEM, SEED = 16 * MiB, 48 * MiB, 7
TIMEOUT = 60.0


@dataclass(frozen=True)
class Taken:
    """A snapshot and what the original guest answered after it."""

    directory: str
    vcpus: int
    ref: FunctionReference
    requests: tuple[str, ...]
    answers: tuple[str, ...]


def _requests(ref: FunctionReference) -> tuple[str, ...]:
    return (f"get {ref.key(5)}", "sum 100 70000", f"key {ref.records - 1}", "info", "checksum",
            "get 12345")


def ask(machine: Machine, requests: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for r in requests:
        machine.console.send(r + "\n")
        out.append(machine.console.read_line(TIMEOUT))
    return tuple(out)


def take_snapshot(directory: str, vcpus: int) -> Taken:
    """Boot, snapshot at READY, then let the original answer the requests."""
    wa = function_args(STATE, SEED)
    ref = FunctionReference(STATE, SEED, vcpus)
    requests = _requests(ref)
    with Machine.create(MEM, vcpus) as m:
        park_function_at_ready(m, wa, timeout=TIMEOUT)
        save_snapshot(m, directory, workload=("function", wa.args))
        m.resume()
        answers = ask(m, requests)
        m.console.close_input()
        assert m.wait(TIMEOUT).status == 0
    assert answers == tuple(ref.answer(r) for r in requests)
    return Taken(directory, vcpus, ref, requests, answers)


@pytest.fixture(scope="module", params=[1, 2], ids=["1vcpu", "2vcpu"])
def taken(request: pytest.FixtureRequest) -> Iterator[Taken]:
    with tempfile.TemporaryDirectory(prefix="pagein-test-snap-") as d:
        yield take_snapshot(d, request.param)


def finish(vm: RestoredVm, taken: Taken) -> None:
    """Ask every request, compare, and end the guest cleanly."""
    assert ask(vm.machine, taken.requests) == taken.answers
    vm.machine.console.close_input()
    assert vm.wait(TIMEOUT).status == 0


@pytest.mark.parametrize("backend", list(Backend), ids=[b.value for b in Backend])
def test_each_backend_restores_and_answers_as_the_original(taken: Taken, backend: Backend) -> None:
    with restore(taken.directory, RestoreOptions(backend=backend)) as vm:
        assert vm.resume_seconds > 0
        finish(vm, taken)
        # The checksum touched every record and table slot: all of it is in memory now.
        state_pages = (STATE + taken.ref.capacity * 4) // 4096
        assert vm.pages_present() >= state_pages


def test_restore_many_times_from_one_snapshot(taken: Taken) -> None:
    for backend in (Backend.FILE, Backend.UFFD, Backend.FILE):
        with restore(taken.directory, RestoreOptions(backend=backend)) as vm:
            finish(vm, taken)


@pytest.mark.parametrize("strategy", [StrategyName.READAHEAD, StrategyName.POPULATE_ALL])
def test_uffd_strategies(taken: Taken, strategy: StrategyName) -> None:
    with restore(taken.directory, RestoreOptions(strategy=strategy)) as vm:
        finish(vm, taken)


@pytest.fixture
def server(taken: Taken, tmp_path: Path) -> Iterator[str]:
    """An external `pagein serve --socket` for the snapshot, as a fleet would run it."""
    sock = str(tmp_path / "serve.sock")
    with ready_serve([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                      "--mem-file", os.path.join(taken.directory, "memory")], TIMEOUT):
        yield sock


def test_several_vms_at_once_from_one_snapshot_through_one_server(taken: Taken,
                                                                  server: str) -> None:
    opts = RestoreOptions(uffd_socket=server)
    vms = [restore(taken.directory, opts) for _ in range(3)]
    try:
        for vm in vms:  # every request queued first: the three guests run together
            for r in taken.requests:
                vm.machine.console.send(r + "\n")
        for vm in vms:
            got = tuple(vm.machine.console.read_line(TIMEOUT) for _ in taken.requests)
            assert got == taken.answers
            vm.machine.console.close_input()
            assert vm.wait(TIMEOUT).status == 0
    finally:
        for vm in vms:
            vm.close()


def test_snapshot_a_restored_vm_again_and_restore_that(taken: Taken, tmp_path: Path) -> None:
    again = str(tmp_path / "again")
    first, rest = taken.requests[:2], taken.requests[2:]
    with restore(taken.directory, RestoreOptions()) as vm:
        assert ask(vm.machine, first) == taken.answers[:2]
        vm.machine.pause()
        save_snapshot(vm.machine, again, workload=vm.snapshot.workload)
        vm.machine.resume()
        assert ask(vm.machine, rest) == taken.answers[2:]
    snap = load_snapshot(again)
    assert snap.active_vcpus == frozenset(range(taken.vcpus))
    for backend in (Backend.COPY, Backend.UFFD):
        with restore(again, RestoreOptions(backend=backend)) as vm2:
            assert ask(vm2.machine, rest) == taken.answers[2:]
            vm2.machine.console.close_input()
            assert vm2.wait(TIMEOUT).status == 0


def test_snapshot_over_the_file_a_vm_is_mapped_from(taken: Taken, tmp_path: Path) -> None:
    # The new memory file replaces the old one by rename: the VM mapped MAP_PRIVATE from
    # the old one keeps its (unlinked) pages and goes on answering correctly.
    d = tmp_path / "own"
    shutil.copytree(taken.directory, d)
    first, rest = taken.requests[:2], taken.requests[2:]
    with restore(str(d), RestoreOptions(backend=Backend.FILE)) as vm:
        assert ask(vm.machine, first) == taken.answers[:2]
        vm.machine.pause()
        save_snapshot(vm.machine, str(d), workload=vm.snapshot.workload)
        vm.machine.resume()
        assert ask(vm.machine, rest) == taken.answers[2:]
    with restore(str(d), RestoreOptions(backend=Backend.FILE)) as vm2:
        assert ask(vm2.machine, rest) == taken.answers[2:]


def test_handler_death_stops_the_guest_loudly_never_zero_pages(taken: Taken) -> None:
    with restore(taken.directory, RestoreOptions()) as vm:
        assert ask(vm.machine, taken.requests[:1]) == taken.answers[:1]
        assert vm.handler_pid is not None
        os.kill(vm.handler_pid, signal.SIGKILL)
        # The checksum needs every state page, almost all still missing.
        vm.machine.console.send("checksum\n")
        with pytest.raises(HandlerError, match="went away while the guest depended on it"):
            vm.wait(TIMEOUT)
        lines = vm.machine.console.output().decode().splitlines()
        # Never a wrong answer: either none, or the right one if it raced ahead.
        assert lines[0] == taken.answers[0]
        assert lines[1:] in ([], [taken.ref.answer("checksum")])


_DYING_HANDLER = textwrap.dedent("""
    import select, socket, sys
    from pagein.sys.fdpass import recv_with_fds
    from pagein.sys.uffd import PageFault, Userfaultfd
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sys.argv[1]); srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    got = recv_with_fds(conn, 65536, 4)
    uffd = Userfaultfd.adopt(got.fds[0])
    # Wait for the guest's first fault: a vCPU now waits on a page, then die unserved.
    while not any(isinstance(e, PageFault) for e in uffd.read_events()):
        select.select([uffd], [], [], 30)
    print("faulted", flush=True)
""")


def test_a_handler_that_dies_with_a_vcpu_waiting_fails_the_restore(taken: Taken,
                                                                   tmp_path: Path) -> None:
    sock = str(tmp_path / "dying.sock")
    proc = subprocess.Popen([sys.executable, "-c", _DYING_HANDLER, sock],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "listening"
        # A handler that is not pagein serve: it would never answer the identity check.
        opts = RestoreOptions(uffd_socket=sock, check_identity=False)
        with restore(taken.directory, opts) as vm:
            vm.machine.console.send(taken.requests[0] + "\n")
            assert proc.stdout.readline().strip() == "faulted"
            assert proc.wait(TIMEOUT) == 0
            with pytest.raises(HandlerError, match=re.escape(f"handler at {sock} for")):
                vm.wait(TIMEOUT)
            # The guest ran on nothing but served pages: it never answered.
            assert vm.machine.console.output() == b""
        # close() served the pages the stopped vCPUs waited on from the snapshot, so they
        # left KVM_RUN and the memory could be unmapped: nothing leaked, nothing crashed.
        assert all(m.closed for m in vm.mappings)
        assert not vm.machine.active_vcpus
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


_SECOND_PROCESS = textwrap.dedent("""
    import hashlib, mmap, sys
    fd, offset, length = (int(a) for a in sys.argv[1:4])
    m = mmap.mmap(fd, offset + length, mmap.MAP_SHARED, mmap.PROT_READ)
    print(hashlib.sha256(m[offset:offset + length]).hexdigest())
""")


@pytest.mark.parametrize("backend", [Backend.UFFD, Backend.COPY], ids=["uffd", "copy"])
def test_shared_memory_is_seen_restored_by_a_second_process(taken: Taken,
                                                           backend: Backend) -> None:
    length = STATE + taken.ref.capacity * 4  # records and table: never written after READY
    with open(os.path.join(taken.directory, "memory"), "rb") as f:
        f.seek(HEAP_START)
        want = f.read(length)
    assert any(want[:4096])
    opts = RestoreOptions(backend=backend, shared_memory=True)
    with restore(taken.directory, opts) as vm:
        assert vm.memfd is not None
        # The checksum makes the guest touch (and the handler fill) every state page.
        assert ask(vm.machine, ("checksum",)) == (taken.ref.answer("checksum"),)
        out = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(vm.memfd.fileno()),
                              str(HEAP_START), str(length)], pass_fds=(vm.memfd.fileno(),),
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        assert out.stdout.strip() == hashlib.sha256(want).hexdigest()
        # The guest still answers from the same, shared pages.
        assert ask(vm.machine, taken.requests[:1]) == taken.answers[:1]


def test_file_backend_refuses_shared_memory(taken: Taken) -> None:
    with pytest.raises(ValueError, match="MAP_PRIVATE"):
        restore(taken.directory, RestoreOptions(backend=Backend.FILE, shared_memory=True))
