"""Diff snapshots from dirty tracking and restores of their chains, on the real /dev/kvm.

A `function` guest is snapshotted full, then changed with `update A B S` and snapshotted
as diffs; every layer is restored with every backend and answers like the numpy
reference at that point. Altered, missing and reordered parents are refused.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _guest import park_function_at_ready
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagein.errors import HandlerError, IntegrityError, SnapshotFormatError
from pagein.snapshot.chain import LAYER_FILE, ChainSource, read_layer, resolve_chain
from pagein.snapshot.open import open_source
from pagein.snapshot.raw import data_extents
from pagein.snapshot.source import PageSource
from pagein.snapshot.store import ops
from pagein.snapshot.store.backend import LocalBackend
from pagein.snapshot.store.layout import read_manifest
from pagein.sys.mapping import Mapping
from pagein.sys.pagemap import Pagemap
from pagein.sys.poll import wait_readable
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import Backend, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

MiB = 1 << 20
STATE, MEM, SEED = 8 * MiB, 48 * MiB, 3
TIMEOUT = 60.0
CHECKS = ("checksum", "sum 0 100000", "sum 400 900")
UPDATES = ("update 10 500 3", "update 300 4000 5", "update 60000 60001 9")


def ask(machine: Machine, request: str) -> str:
    machine.console.send(request + "\n")
    line = machine.console.read_line(TIMEOUT)
    assert line is not None
    return line


@dataclass(frozen=True)
class Chain:
    layers: tuple[str, ...]                  # full snapshot first
    refs: tuple[FunctionReference, ...]      # the reference at each layer


def _read(src: PageSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)


def _answers(ref: FunctionReference) -> list[str]:
    return [ref.answer(r) for r in CHECKS]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("chain")
    ref = FunctionReference(STATE, SEED)
    wa = function_args(STATE, SEED)
    layers, refs = [], []
    with Machine.create(MEM, 2) as m:
        park_function_at_ready(m, wa, track_dirty=True, timeout=TIMEOUT)
        for i, update in enumerate(("", *UPDATES)):
            if update:
                m.resume()
                assert ask(m, update) == ref.answer(update)
                m.pause(TIMEOUT)
            d = str(root / f"layer{i}")
            snap = save_snapshot(m, d, workload=("function", wa.args), diff=bool(update))
            assert (snap.layer_sha256 is None) == (not update)
            layers.append(d)
            refs.append(copy.deepcopy(ref))
        m.resume()
    yield Chain(tuple(layers), tuple(refs))


@pytest.mark.parametrize("backend", list(Backend))
def test_every_backend_restores_every_layer(chain: Chain, backend: Backend) -> None:
    for directory, ref in zip(chain.layers, chain.refs, strict=True):
        with restore(directory, RestoreOptions(backend=backend)) as vm:
            got = [ask(vm.machine, r) for r in CHECKS]
            assert got == _answers(ref), (directory, backend)
            vm.machine.console.send("quit\n")
            assert vm.wait(TIMEOUT).status == 0


def test_diff_holds_only_changed_pages(chain: Chain) -> None:
    sizes = [read_layer(os.path.join(d, LAYER_FILE)).changed_pages().sum()
             for d in chain.layers[1:]]
    records_pages = STATE // 4096
    # update 10 500 touches ~8 pages of records; 300..4000 ~58; one record ~1 (plus the
    # guest's stack, its line buffer and the page the VMM wrote the request into).
    assert sizes[0] < 40 and sizes[2] < 40 and sizes[1] < 100, sizes
    assert max(sizes) < records_pages // 10


def test_restore_then_diff_then_restore(chain: Chain, tmp_path: Path) -> None:
    """A restored VM is tracked: its diff is a layer on the snapshot it came from."""
    ref = copy.deepcopy(chain.refs[-1])
    with restore(chain.layers[-1], RestoreOptions(backend=Backend.UFFD)) as vm:
        assert ask(vm.machine, "update 5 20 77") == ref.answer("update 5 20 77")
        vm.machine.pause(TIMEOUT)
        save_snapshot(vm.machine, str(tmp_path / "next"), diff=True)
        vm.machine.resume()
    assert resolve_chain(str(tmp_path / "next")).depth == len(UPDATES) + 1
    for backend in Backend:
        with restore(str(tmp_path / "next"), RestoreOptions(backend=backend)) as vm:
            assert [ask(vm.machine, r) for r in CHECKS] == _answers(ref), backend


def test_unchanged_vm_diff_is_almost_empty_and_vmm_writes_are_in_it(tmp_path: Path) -> None:
    wa = function_args(MiB, 1)
    with Machine.create(MEM, 1) as m:
        park_function_at_ready(m, wa, track_dirty=True, timeout=TIMEOUT)
        save_snapshot(m, str(tmp_path / "full"))
        empty = save_snapshot(m, str(tmp_path / "empty"), diff=True)
        assert empty.bytes_written == 0
        # The VMM writes a page the guest never touches: KVM's log cannot see it.
        far = MEM - 4 * MiB
        m.memory.write(far, b"\x5a" * 4096)
        vmm = save_snapshot(m, str(tmp_path / "vmm"), diff=True)
        m.resume()
    pages = read_layer(str(tmp_path / "vmm" / LAYER_FILE)).changed_pages()
    assert np.flatnonzero(pages).tolist() == [far // 4096]
    assert vmm.bytes_written == 4096
    with ChainSource(str(tmp_path / "vmm")) as src:
        assert src.chain.depth == 2
        assert _read(src, far, 4096) == b"\x5a" * 4096


def _data_bytes(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(n for _, n in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def test_bytes_written_counts_data_not_holes_in_full_and_diff(tmp_path: Path) -> None:
    """Both kinds report the bytes their memory file holds: a full snapshot of a mostly
    empty guest is not its RAM size, and a diff of one record is about a page."""
    wa = function_args(MiB, 1)
    with Machine.create(MEM, 1) as m:
        park_function_at_ready(m, wa, track_dirty=True, timeout=TIMEOUT)
        full = save_snapshot(m, str(tmp_path / "full"))
        m.resume()
        assert ask(m, "update 7 8 1").startswith("updated")
        m.pause(TIMEOUT)
        diff = save_snapshot(m, str(tmp_path / "diff"), diff=True)
        m.resume()
    assert full.bytes_written == _data_bytes(full.memory_path)
    assert 0 < full.bytes_written < MEM // 4
    assert diff.bytes_written == _data_bytes(diff.memory_path)
    assert 0 < diff.bytes_written <= 8 * 4096


def _copy_chain(chain: Chain, dest: Path) -> list[str]:
    out = []
    for d in chain.layers:
        target = dest / os.path.basename(d)
        shutil.copytree(d, target)
        out.append(str(target))
    return out


def test_missing_parent_is_refused_naming_it(chain: Chain, tmp_path: Path) -> None:
    layers = _copy_chain(chain, tmp_path)
    shutil.rmtree(layers[1])
    with pytest.raises(SnapshotFormatError, match=f"its parent {layers[1]} is missing"):
        restore(layers[-1], RestoreOptions(backend=Backend.COPY))


def test_altered_parent_is_refused_before_any_guest_runs(chain: Chain, tmp_path: Path) -> None:
    layers = _copy_chain(chain, tmp_path)
    with open(os.path.join(layers[0], "vmstate"), "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"  ")
    with pytest.raises(IntegrityError, match=f"snapshot layer {layers[1]}: its parent "
                                             f"{layers[0]} is not the snapshot"):
        restore(layers[-1], RestoreOptions(backend=Backend.FILE))


def test_reordered_parents_are_refused(chain: Chain, tmp_path: Path) -> None:
    """Swap layers 1 and 2: each now names a parent whose state is not the one recorded."""
    layers = _copy_chain(chain, tmp_path)
    tmp = layers[1] + ".x"
    os.rename(layers[1], tmp)
    os.rename(layers[2], layers[1])
    os.rename(tmp, layers[2])
    with pytest.raises(IntegrityError, match="is not the snapshot it was taken on"):
        restore(layers[-1], RestoreOptions(backend=Backend.UFFD))


def test_corrupt_layer_file_is_refused(chain: Chain, tmp_path: Path) -> None:
    """A flipped byte in the top layer's file fails its checksum; in a parent's, the
    digest the layer above recorded of it."""
    layers = _copy_chain(chain, tmp_path)
    for i, match in ((-1, "snapshot layer file {path} is corrupted"),
                     (2, "its parent's layer file {path} is not the one it was taken on")):
        path = os.path.join(layers[i], LAYER_FILE)
        data = bytearray(Path(path).read_bytes())
        data[-5] ^= 1
        Path(path).write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=match.format(path=path)):
            restore(layers[-1], RestoreOptions(backend=Backend.COPY))
        data[-5] ^= 1
        Path(path).write_bytes(bytes(data))


def test_layer_file_removed_is_refused(chain: Chain, tmp_path: Path) -> None:
    """Without its layer file a diff would read as a full snapshot of mostly zeros."""
    layers = _copy_chain(chain, tmp_path)
    os.unlink(os.path.join(layers[1], LAYER_FILE))
    with pytest.raises(SnapshotFormatError, match="records a layer file that is missing"):
        restore(layers[1], RestoreOptions(backend=Backend.COPY))


def test_verify_memory_of_a_chain_names_the_corrupt_layer(chain: Chain, tmp_path: Path) -> None:
    layers = _copy_chain(chain, tmp_path)
    pages = np.flatnonzero(read_layer(os.path.join(layers[2], LAYER_FILE)).changed_pages())
    with open(os.path.join(layers[2], "memory"), "r+b") as f:
        f.seek(int(pages[0]) * 4096 + 8)
        f.write(b"\xff" * 8)
    with pytest.raises(IntegrityError, match=f"snapshot layer {layers[2]} is corrupted"):
        restore(layers[-1], RestoreOptions(backend=Backend.COPY, verify_memory=True))


def test_squash_restores_like_the_chain(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "full"
    res = subprocess.run([sys.executable, "-m", "pagein", "snapshot", "squash",
                          chain.layers[-1], "--out", str(out)], capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr
    assert f"squashed {len(UPDATES)} diff layers into {out}" in res.stdout
    assert not (out / LAYER_FILE).exists()
    with ChainSource(chain.layers[-1]) as src:
        flat = _read(src, 0, src.size)
    assert (out / "memory").read_bytes() == flat
    for backend in Backend:
        with restore(str(out), RestoreOptions(backend=backend, verify_memory=True)) as vm:
            assert [ask(vm.machine, r) for r in CHECKS] == _answers(chain.refs[-1]), backend


def test_squash_into_its_own_chain_is_refused(chain: Chain) -> None:
    res = subprocess.run([sys.executable, "-m", "pagein", "snapshot", "squash",
                          chain.layers[-1], "--out", chain.layers[1]], capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 2
    assert f"--out {chain.layers[1]} is a layer of the chain being squashed" in res.stderr


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(updates=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 1500),
                                  st.integers(0, 2**32)), min_size=1, max_size=6),
       pick=st.integers(0, 6), backend=st.sampled_from(list(Backend)))
def test_random_update_chains_restore_like_the_reference(
        tmp_path: Path, updates: list[tuple[int, int, int]], pick: int,
        backend: Backend) -> None:
    """Any sequence of updates, a diff after each: a random layer restores exactly."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    state = 2 * MiB
    ref = FunctionReference(state, SEED)
    wa = function_args(state, SEED)
    refs = []
    with Machine.create(32 * MiB, 2) as m:
        park_function_at_ready(m, wa, track_dirty=True, timeout=TIMEOUT)
        save_snapshot(m, str(root / "l0"), workload=("function", wa.args))
        refs.append(copy.deepcopy(ref))
        for i, (a, n, s) in enumerate(updates, 1):
            m.resume()
            req = f"update {a} {a + n} {s}"
            assert ask(m, req) == ref.answer(req)
            m.pause(TIMEOUT)
            save_snapshot(m, str(root / f"l{i}"), diff=True)
            refs.append(copy.deepcopy(ref))
        m.resume()
    k = pick % len(refs)
    with restore(str(root / f"l{k}"), RestoreOptions(backend=backend)) as vm:
        assert [ask(vm.machine, r) for r in CHECKS] == _answers(refs[k])


def test_store_push_of_a_chain_uploads_only_new_chunks_and_serves_it(
        chain: Chain, tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "store", create=True)
    base = ops.push(backend, os.path.join(chain.layers[0], "memory"), "base",
                    chunk_size=64 << 10)
    top = ops.push(backend, chain.layers[-1], "top", chunk_size=64 << 10)
    # The updates touched a few hundred KiB: a handful of 64 KiB chunks are new.
    assert 0 < top.new_chunks <= 20 < base.new_chunks, (top, base)
    manifest = read_manifest(backend, "top")
    assert len(manifest.layers) == len(chain.layers)
    with ChainSource(chain.layers[-1]) as flat, open_source(
            f"dir://{tmp_path / 'store'}/top", cache_dir=None) as served:
        assert served.size == flat.size
        buf = bytearray(served.size)
        served.read_into(0, memoryview(buf))
        assert bytes(buf) == _read(flat, 0, flat.size)


def _serve(source: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp_path / "serve.sock")
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                             "--source", source, "--ready-fd", str(w)], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert wait_readable([r], TIMEOUT) and os.read(r, 16), "serve did not start"
    finally:
        os.close(r)
    return proc, sock


def test_serving_a_chain_shares_pages_and_refuses_another_layer(chain: Chain,
                                                                tmp_path: Path) -> None:
    """`pagein serve --source LAYER` fills one page cache from the flattened chain; two
    --share-pages clones of the layer answer like the reference and share its pages;
    a restore of another layer through that server is refused."""
    proc, sock = _serve(chain.layers[-1], tmp_path)
    try:
        # Another layer of the same size is refused before any guest runs, not served
        # the top's pages (the identity line names the layer file, which binds a chain).
        with pytest.raises(HandlerError, match=f"this handler serves {chain.layers[-1]} "
                                               r"\(chain of 3 diff layers\)"):
            restore(chain.layers[2], RestoreOptions(uffd_socket=sock))
        clones = [restore(chain.layers[-1], RestoreOptions(uffd_socket=sock,
                                                           share_pages=True))
                  for _ in range(2)]
        try:
            for vm in clones:
                assert [ask(vm.machine, r) for r in CHECKS] == _answers(chain.refs[-1])
            with Mapping.anonymous(4096) as z, Pagemap() as pm:
                z.read(0, 1)  # the kernel's zero page: not a shared snapshot page
                zero = pm.pages(z.address, 4096)[0].pfn
                a, b = ([p.pfn if p.present else 0 for m in vm.mappings
                         for p in pm.pages(m.address, m.length)] for vm in clones)
            # The records the checksum read are the cache's pages in both clones.
            assert sum(x == y and x not in (0, zero) for x, y in zip(a, b, strict=True)) \
                >= STATE // 4096
        finally:
            for vm in clones:
                vm.close()
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
    # And with the handler spawned for the VM (it resolves the chain itself).
    with restore(chain.layers[2], RestoreOptions(share_pages=True)) as vm:
        assert [ask(vm.machine, r) for r in CHECKS] == _answers(chain.refs[2])
