"""The snapshot files: round trip, and every damaged file refused before a guest runs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import park_function_at_ready
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagein.errors import IntegrityError, PageinError, SnapshotFormatError, Unavailable
from pagein.vmm import layout
from pagein.vmm import restore as restore_mod
from pagein.vmm.control import ControlServer, request
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoreOptions, restore
from pagein.vmm.snapshot import (
    MEMORY_FILE,
    STATE_FILE,
    Snapshot,
    encode_state,
    load_snapshot,
    save_snapshot,
    verify_memory,
)
from pagein.vmm.workloads import function_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import empty_hugetlb_pool

MiB = 1 << 20
HEADER = 56


@pytest.fixture(scope="module")
def original() -> Iterator[tuple[str, list[object]]]:
    """A 2-vCPU function guest snapshotted at READY, and its vCPU states then."""
    wa = function_args(4 * MiB, 3)
    with tempfile.TemporaryDirectory(prefix="pagein-test-snapfmt-") as d, \
            Machine.create(32 * MiB, 2) as m:
        park_function_at_ready(m, wa)
        m.console.send("key 1\n")  # queued, unread: the snapshot must keep it
        saved = save_snapshot(m, d, workload=("function", wa.args))
        m.stop()
        yield d, list(saved.vcpus)


@pytest.fixture
def snap_dir(original: tuple[str, list[object]], tmp_path: Path) -> Path:
    """A private copy of the snapshot to damage."""
    d = tmp_path / "snap"
    shutil.copytree(original[0], d)
    return d


def test_round_trip_keeps_every_vcpu_field_console_and_layout(
        original: tuple[str, list[object]]) -> None:
    d, states = original
    snap = load_snapshot(d)
    assert list(snap.vcpus) == states
    assert all(s.xsave and s.events and s.fpu and s.msrs for s in snap.vcpus)
    assert snap.active_vcpus == frozenset({0, 1})
    assert snap.pending_input == b"key 1\n"
    assert snap.workload == ("function", function_args(4 * MiB, 3).args)
    assert [(r.guest_phys, r.size, r.offset) for r in snap.regions] == [(0, 32 * MiB, 0)]
    assert os.path.getsize(snap.memory_path) == 32 * MiB
    # Untouched guest memory became holes in the memory file.
    assert os.stat(snap.memory_path).st_blocks * 512 < 16 * MiB
    verify_memory(snap)


@pytest.fixture
def no_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a restore gets as far as creating a machine."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a guest was created from a damaged snapshot")
    monkeypatch.setattr(restore_mod, "Machine", refuse)


def _restore_error(d: Path, **opts: object) -> str:
    with pytest.raises(SnapshotFormatError) as info:
        restore(str(d), RestoreOptions(**opts))  # type: ignore[arg-type]
    return str(info.value)


@pytest.mark.usefixtures("no_guest")
@pytest.mark.parametrize("keep", [0, 30, HEADER, HEADER + 100])
def test_truncated_state_file_is_refused(snap_dir: Path, keep: int) -> None:
    state = snap_dir / STATE_FILE
    state.write_bytes(state.read_bytes()[:keep])
    msg = _restore_error(snap_dir)
    assert "truncated" in msg and str(state) in msg


@pytest.mark.usefixtures("no_guest")
def test_corrupted_state_file_fails_its_checksum(snap_dir: Path) -> None:
    state = snap_dir / STATE_FILE
    data = bytearray(state.read_bytes())
    data[HEADER + 200] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"SHA-256 of its .*body does not match"):
        restore(str(snap_dir), RestoreOptions(backend=Backend.COPY))


@pytest.mark.usefixtures("no_guest")
def test_unknown_version_and_magic_are_named(snap_dir: Path) -> None:
    state = snap_dir / STATE_FILE
    data = bytearray(state.read_bytes())
    struct.pack_into("<I", data, 8, 99)
    state.write_bytes(bytes(data))
    assert "format version 99, this pagein reads version 1" in _restore_error(snap_dir)
    data[:8] = b"NOTASNAP"
    state.write_bytes(bytes(data))
    assert "not a pagein VM state file" in _restore_error(snap_dir)


@pytest.mark.usefixtures("no_guest")
def test_a_bad_field_is_named(snap_dir: Path) -> None:
    state = snap_dir / STATE_FILE
    doc = json.loads(state.read_bytes()[HEADER:])
    doc["vcpus"][1]["sregs"] = base64.b64encode(b"short").decode()
    state.write_bytes(encode_state(doc))
    assert "field vcpus[1].sregs holds 5 bytes" in _restore_error(snap_dir)
    doc = json.loads(state.read_bytes()[HEADER:])
    del doc["vcpus"][1]["sregs"], doc["memory"]["regions"][0]["offset"]
    doc["vcpus"][1]["sregs"] = doc["vcpus"][0]["sregs"]
    state.write_bytes(encode_state(doc))
    assert "field memory.regions[0].offset is missing" in _restore_error(snap_dir)


@pytest.mark.usefixtures("no_guest")
@pytest.mark.parametrize("backend", list(Backend), ids=[b.value for b in Backend])
def test_truncated_memory_file_is_refused(snap_dir: Path, backend: Backend) -> None:
    memory = snap_dir / MEMORY_FILE
    os.truncate(memory, 20 * MiB)
    msg = _restore_error(snap_dir, backend=backend)
    assert "is truncated: 20971520 bytes, the state file records 33554432" in msg
    assert str(memory) in msg
    memory.unlink()
    assert "is missing" in _restore_error(snap_dir, backend=backend)


@pytest.mark.usefixtures("no_guest")
@pytest.mark.parametrize("backend", list(Backend), ids=[b.value for b in Backend])
def test_a_directory_as_memory_file_is_named(snap_dir: Path, backend: Backend) -> None:
    memory = snap_dir / MEMORY_FILE
    memory.unlink()
    memory.mkdir()
    msg = _restore_error(snap_dir, backend=backend)
    assert f"snapshot memory file {memory} is a directory" in msg, msg
    assert "truncated" not in msg


@pytest.mark.usefixtures("no_guest")
def test_more_vcpus_than_the_vmm_runs_are_refused_naming_the_limit(snap_dir: Path) -> None:
    state = snap_dir / STATE_FILE
    doc = json.loads(state.read_bytes()[HEADER:])
    doc["vcpus"] = [doc["vcpus"][0]] * 64
    state.write_bytes(encode_state(doc))
    msg = _restore_error(snap_dir)
    assert f"snapshot state file {state} holds 64 vCPUs; pagein's VMM runs at most " \
           f"{layout.MAX_VCPUS}" in msg, msg
    assert "--vcpus" not in msg  # restore has no such flag


def _huge_page_snapshot(snap_dir: Path) -> None:
    """Say the snapshot's one 32 MiB region is backed by 2 MiB pages."""
    state = snap_dir / STATE_FILE
    doc = json.loads(state.read_bytes()[HEADER:])
    doc["memory"]["regions"][0]["page_size"] = 2 * MiB
    state.write_bytes(encode_state(doc))


@pytest.mark.hugetlb
@pytest.mark.usefixtures("no_guest")
def test_copy_restore_with_an_empty_hugetlb_pool_names_the_pool(snap_dir: Path) -> None:
    _huge_page_snapshot(snap_dir)
    with empty_hugetlb_pool(), pytest.raises(Unavailable) as info:
        restore(str(snap_dir), RestoreOptions(backend=Backend.COPY))
    msg = str(info.value)
    assert "needs 16 free 2048 KiB pages, the pool can give 0" in msg, msg
    assert "raise vm.nr_hugepages" in msg and "Bad address" not in msg


@pytest.mark.hugetlb
@pytest.mark.usefixtures("no_guest")
def test_efault_copying_into_hugetlb_memory_names_the_pool(
        snap_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the up-front check (the pool may empty between it and the copy): the copy's
    # own EFAULT must still say why.
    _huge_page_snapshot(snap_dir)
    monkeypatch.setattr(restore_mod, "_check_pool", lambda snap, opts: None)
    with empty_hugetlb_pool(), pytest.raises(Unavailable) as info:
        restore(str(snap_dir), RestoreOptions(backend=Backend.COPY))
    msg = str(info.value)
    assert "copying the snapshot into 2048 KiB guest memory failed (EFAULT)" in msg, msg
    assert "the hugetlb pool has no free 2048 KiB page; raise vm.nr_hugepages" in msg


@pytest.mark.usefixtures("no_guest")
def test_corrupted_memory_file_is_caught_when_verifying(snap_dir: Path) -> None:
    memory = snap_dir / MEMORY_FILE
    with open(memory, "r+b") as f:
        f.seek(17 * MiB)
        byte = f.read(1)
        f.seek(17 * MiB)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=r"memory file .* is corrupted"):
        restore(str(snap_dir), RestoreOptions(backend=Backend.UFFD, verify_memory=True))


def test_snapshot_type_is_what_restore_accepts(original: tuple[str, list[object]]) -> None:
    snap = load_snapshot(original[0])
    assert isinstance(snap, Snapshot)
    with restore(snap, RestoreOptions(backend=Backend.FILE)) as vm:
        # The pending input went back into the console: the guest answers it unasked.
        assert vm.machine.console.read_line(60) == str(FunctionReference(4 * MiB, 3).key(1))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=1 << 16), flip=st.integers(min_value=0),
       bit=st.integers(min_value=0, max_value=7))
def test_any_truncation_or_flipped_bit_is_refused(original: tuple[str, list[object]],
                                                 cut: int, flip: int, bit: int) -> None:
    data = (Path(original[0]) / STATE_FILE).read_bytes()
    flipped = bytearray(data)
    flipped[flip % len(data)] ^= 1 << bit
    for damaged in (data[: cut % len(data)], bytes(flipped)):
        with tempfile.TemporaryDirectory(prefix="pagein-test-fuzz-") as d:
            (Path(d) / STATE_FILE).write_bytes(damaged)
            with pytest.raises(SnapshotFormatError):
                load_snapshot(d, check_memory=False)


def test_control_socket_snapshots_a_running_guest_and_names_bad_requests(tmp_path: Path) -> None:
    wa = function_args(1 * MiB, 2)
    sock, out = str(tmp_path / "ctl.sock"), str(tmp_path / "live")
    with Machine.create(32 * MiB, 1) as m, ControlServer(m, sock, workload=("function",
                                                                             wa.args)):
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        m.console.send("key 4\n")
        assert m.console.read_line(60) == str(FunctionReference(1 * MiB, 2).key(4))
        assert request(sock, {"op": "status"})["active_vcpus"] == [0]
        assert request(sock, {"op": "snapshot", "dir": out})["memory_bytes"] == 32 * MiB
        assert load_snapshot(out).workload == ("function", wa.args)
        with pytest.raises(PageinError, match="unknown op 'reboot'"):
            request(sock, {"op": "reboot"})
        with pytest.raises(PageinError, match='needs "dir"'):
            request(sock, {"op": "snapshot"})
        m.console.close_input()
        assert m.wait(60).status == 0
        with pytest.raises(PageinError, match="the guest has ended"):
            request(sock, {"op": "snapshot", "dir": out})
    assert not os.path.exists(sock)
