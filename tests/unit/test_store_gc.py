"""gc on a directory store: what it keeps, and that it loses nothing while pushes run."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from pagein.errors import SnapshotFormatError
from pagein.snapshot.store import ops
from pagein.snapshot.store.backend import LocalBackend
from pagein.snapshot.store.layout import snapshot_names

CS = 64 << 10


def write_image(path: Path, seed: int, chunks: int = 12, shared_seed: int = 0) -> bytes:
    """Half the chunks come from a shared base (dedupe across images), half are own."""
    base = random.Random(shared_seed)
    own = random.Random(seed)
    out = bytearray()
    for i in range(chunks):
        rnd = base if i % 2 == 0 else own
        out += rnd.randbytes(CS // 4) * 4
    path.write_bytes(out)
    return bytes(out)


def age_chunks(backend: LocalBackend, seconds: float = 10.0) -> None:
    """Backdate every chunk file: file mtimes tick in jiffies, and gc keeps anything
    not strictly older than its own marker."""
    past = time.time() - seconds
    for p in (backend.root / "chunks").rglob("*.zst"):
        os.utime(p, (past, past))


def stored_chunks(backend: LocalBackend) -> int:
    return sum(1 for _ in backend.list("chunks/"))


def test_gc_keeps_referenced_and_young(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    a = write_image(tmp_path / "a", 1)
    write_image(tmp_path / "b", 2)
    ops.push(backend, tmp_path / "a", "a", chunk_size=CS)
    ops.push(backend, tmp_path / "b", "b", chunk_size=CS)
    total = stored_chunks(backend)
    ops.remove(backend, "b")
    age_chunks(backend)
    young = ops.gc(backend)  # default grace: b's chunks are too young to go
    assert young.chunks_deleted == 0 and young.kept_young == 6
    dry = ops.gc(backend, grace_seconds=0, dry_run=True)
    assert dry.chunks_deleted == 6 and stored_chunks(backend) == total
    done = ops.gc(backend, grace_seconds=0)
    assert done.chunks_deleted == 6 and stored_chunks(backend) == total - 6
    ops.pull(backend, "a", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == a
    assert not list(backend.list("gc/")) and not list(backend.list("pushes/"))


def test_gc_spares_chunks_of_an_unfinished_push(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    write_image(tmp_path / "a", 1)
    seen: list[ops.GcStats] = []

    def during_upload(p: ops.Progress) -> None:
        if p.phase == "uploading" and p.done == p.total:
            # Chunks are stored but no manifest names them yet.
            seen.append(ops.gc(backend, grace_seconds=0))

    ops.push(backend, tmp_path / "a", "a", chunk_size=CS, progress=during_upload)
    assert seen and seen[0].chunks_deleted == 0 and seen[0].kept_young > 0
    assert ops.verify(backend, "a") == []


def test_push_restores_a_reused_chunk_that_gc_deleted(tmp_path: Path) -> None:
    """The dangerous interleaving: push sees chunk X present, gc then deletes X."""
    backend = LocalBackend(tmp_path / "s", create=True)
    content = write_image(tmp_path / "a", 1)
    ops.push(backend, tmp_path / "a", "old", chunk_size=CS)
    ops.remove(backend, "old")
    age_chunks(backend)  # older than the push marker
    deleted: list[int] = []

    def after_listing(p: ops.Progress) -> None:
        if p.phase == "listed":
            deleted.append(ops.gc(backend, grace_seconds=0).chunks_deleted)

    stats = ops.push(backend, tmp_path / "a", "new", chunk_size=CS, progress=after_listing)
    assert deleted == [stats.unique_chunks]  # gc really removed every reused chunk
    assert stats.new_chunks == 0 and stats.reuploaded == stats.unique_chunks
    ops.pull(backend, "new", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == content


def test_push_waits_for_a_running_gc(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    content = write_image(tmp_path / "a", 1)
    ops.push(backend, tmp_path / "a", "old", chunk_size=CS)
    gc_started = threading.Event()
    release_gc = threading.Event()
    phases: list[str] = []

    def gc_hook(p: ops.Progress) -> None:
        if p.phase == "listing chunks":
            gc_started.set()
            if not release_gc.wait(timeout=20):
                raise TimeoutError("push never released the gc")

    def push_hook(p: ops.Progress) -> None:
        phases.append(p.phase)
        if p.phase == "waiting for gc":
            release_gc.set()

    worker = threading.Thread(target=ops.gc, args=(backend,),
                              kwargs={"grace_seconds": 0, "progress": gc_hook})
    worker.start()
    try:
        assert gc_started.wait(timeout=10)
        ops.push(backend, tmp_path / "a", "new", chunk_size=CS, progress=push_hook)
    finally:
        release_gc.set()
        worker.join(timeout=20)
    assert "waiting for gc" in phases
    assert ops.verify(backend, "new") == [] and ops.verify(backend, "old") == []
    ops.pull(backend, "new", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == content


def test_gc_in_a_loop_while_pushing_loses_nothing(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = [0]

    def collector() -> None:
        try:
            while not stop.is_set():
                ops.gc(backend, grace_seconds=0)
                runs[0] += 1
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    worker = threading.Thread(target=collector)
    worker.start()
    images = {}
    try:
        for i in range(8):
            name = f"vm{i}"
            images[name] = write_image(tmp_path / name, seed=i, chunks=16)
            ops.push(backend, tmp_path / name, name, chunk_size=CS, workers=2)
            if i % 3 == 2:  # drop an older snapshot so gc has real work
                victim = f"vm{i - 2}"
                ops.remove(backend, victim)
                del images[victim]
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors and runs[0] > 0
    assert snapshot_names(backend) == sorted(images)
    for name, content in images.items():
        ops.pull(backend, name, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == content, name


def test_gc_deletes_nothing_when_a_manifest_is_unreadable(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    write_image(tmp_path / "a", 1)
    ops.push(backend, tmp_path / "a", "a", chunk_size=CS)
    (backend.root / "manifests" / "broken.json").write_text('{"format": "pagein-store-manifest"')
    before = stored_chunks(backend)
    with pytest.raises(SnapshotFormatError, match=r"broken\.json"):
        ops.gc(backend, grace_seconds=0)
    assert stored_chunks(backend) == before


def test_gc_removes_stale_markers(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s", create=True)
    backend.put("pushes/dead.0.json", b"{}")
    old = time.time() - ops.MARKER_TTL_SECONDS - 60
    os.utime(backend.root / "pushes/dead.0.json", (old, old))
    assert ops.gc(backend, grace_seconds=0).stale_markers_removed == 1
    assert not list(backend.list("pushes/"))
