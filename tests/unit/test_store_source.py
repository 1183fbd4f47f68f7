"""ChunkedSource on a directory store: integrity, missing chunks, single flight, cache."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagein.errors import IntegrityError, SourceError
from pagein.snapshot.open import open_source
from pagein.snapshot.store import open_store_source, ops
from pagein.snapshot.store.backend import Backend, LocalBackend, ObjectInfo
from pagein.snapshot.store.cache import ChunkCache
from pagein.snapshot.store.layout import chunk_key, read_manifest
from pagein.snapshot.store.source import ChunkedSource

CS = 64 << 10


def image(chunks: int) -> bytes:
    """Distinct, compressible chunks with a zero chunk at index 2."""
    out = bytearray()
    for i in range(chunks):
        out += bytes(CS) if i == 2 else (f"chunk {i:05d} ".encode() * (CS // 12 + 1))[:CS]
    return bytes(out)


@pytest.fixture
def store(tmp_path: Path) -> tuple[LocalBackend, bytes]:
    content = image(8)
    (tmp_path / "mem").write_bytes(content)
    backend = LocalBackend(tmp_path / "store", create=True)
    ops.push(backend, tmp_path / "mem", "vm", chunk_size=CS)
    return backend, content


def chunk_path(backend: LocalBackend, index: int) -> Path:
    ref = read_manifest(backend, "vm").chunks[index]
    assert ref is not None
    return backend.root / chunk_key(ref.digest)


def test_corrupt_chunk_raises_before_any_byte(store: tuple[LocalBackend, bytes],
                                              tmp_path: Path) -> None:
    backend, _ = store
    path = chunk_path(backend, 4)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(raw)
    with open_store_source("dir", f"{backend.root}/vm", cache_dir=tmp_path / "c") as source:
        buf = bytearray(b"\xee" * (3 * CS))
        with pytest.raises(IntegrityError, match=r"chunk 4 .* of snapshot dir://.*/vm"):
            source.read_into(3 * CS, memoryview(buf))  # chunks 3 (good), 4 (bad), 5 (good)
        assert buf == b"\xee" * (3 * CS)  # nothing copied, not even chunk 3
        # The bad object was not cached: the next read fails the same way.
        with pytest.raises(IntegrityError):
            source.read_into(4 * CS, memoryview(bytearray(10)))
    assert not list((tmp_path / "c").rglob(path.name))  # never cached


def test_missing_chunk_is_source_error(store: tuple[LocalBackend, bytes], tmp_path: Path) -> None:
    backend, content = store
    chunk_path(backend, 6).unlink()
    with open_source(f"dir://{backend.root}/vm", cache_dir=None) as source:
        buf = bytearray(b"\x11" * 100)
        with pytest.raises(SourceError, match=r"chunk 6 .* is missing from the store"):
            source.read_into(6 * CS + 5, memoryview(buf))
        assert buf == b"\x11" * 100
        ok = bytearray(CS)
        source.read_into(5 * CS, memoryview(ok))  # other chunks still serve
        assert ok == content[5 * CS:6 * CS]


def test_zero_chunk_reads_zero_without_store(store: tuple[LocalBackend, bytes]) -> None:
    backend, _ = store
    with open_store_source("dir", f"{backend.root}/vm", cache_dir=None) as source:
        buf = bytearray(b"\x55" * CS)
        source.read_into(2 * CS, memoryview(buf))
        assert buf == bytes(CS)
        assert source.fetches == 0
        assert source.zero_extents(0, source.size) == [(2 * CS, CS)]


class GatedBackend(Backend):
    """Wraps a backend; ``get`` counts calls and waits at a barrier or gate."""

    def __init__(self, inner: Backend, barrier: threading.Barrier | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.gets = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.barrier = barrier
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            self.gets += 1
        self.entered.set()
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # BrokenBarrierError if fetches were serial
        elif not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def delete(self, keys: list[str]) -> None:
        self.inner.delete(keys)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)


def test_single_flight_for_one_chunk(store: tuple[LocalBackend, bytes]) -> None:
    backend, content = store
    gated = GatedBackend(backend)
    with ChunkedSource(gated, read_manifest(backend, "vm"), ChunkCache(None)) as source:
        first = source._chunk(5)
        assert gated.entered.wait(timeout=10)
        # Every further request while the fetch is in flight joins it.
        assert all(source._chunk(5) is first for _ in range(10))
        results: list[bytes] = []

        def reader(off: int) -> None:
            buf = bytearray(4096)
            source.read_into(5 * CS + off, memoryview(buf))
            results.append(bytes(buf))

        threads = [threading.Thread(target=reader, args=(i * 4096,)) for i in range(8)]
        for t in threads:
            t.start()
        gated.gate.set()
        for t in threads:
            t.join(timeout=10)
        assert gated.gets == 1
        assert sorted(results) == sorted(content[5 * CS + i * 4096:5 * CS + (i + 1) * 4096]
                                         for i in range(8))


def test_chunks_of_one_read_fetch_concurrently(store: tuple[LocalBackend, bytes]) -> None:
    backend, content = store
    gated = GatedBackend(backend, threading.Barrier(3))
    with ChunkedSource(gated, read_manifest(backend, "vm"), ChunkCache(None),
                       workers=3) as source:
        buf = bytearray(3 * CS)
        source.read_into(3 * CS, memoryview(buf))  # chunks 3, 4, 5 meet at the barrier
        assert buf == content[3 * CS:6 * CS]


def test_disk_cache_serves_other_sources_and_heals(store: tuple[LocalBackend, bytes],
                                                    tmp_path: Path) -> None:
    backend, content = store
    cache_dir = tmp_path / "cache"
    with ChunkedSource(backend, read_manifest(backend, "vm"),
                       ChunkCache(cache_dir), owns_backend=False) as first:
        first.read_into(0, memoryview(bytearray(len(content))))
        assert first.fetches == 7  # 8 chunks, one all-zero
    cached = sorted(cache_dir.rglob("*.zst"))
    assert len(cached) == 7
    # Damage one cache file: the next source refetches it and repairs the cache.
    victim = cached[0]
    victim.write_bytes(b"garbage")
    with ChunkedSource(backend, read_manifest(backend, "vm"),
                       ChunkCache(cache_dir), owns_backend=False) as second:
        buf = bytearray(len(content))
        second.read_into(0, memoryview(buf))
        assert buf == content
        assert second.fetches == 1
    assert victim.read_bytes() != b"garbage"
    # With the store's chunks gone, a new source still restores from the host cache.
    for p in (backend.root / "chunks").rglob("*.zst"):
        p.unlink()
    with ChunkedSource(backend, read_manifest(backend, "vm"),
                       ChunkCache(cache_dir), owns_backend=False) as third:
        buf = bytearray(len(content))
        third.read_into(0, memoryview(buf))
        assert buf == content and third.fetches == 0


def test_cache_bounds(store: tuple[LocalBackend, bytes], tmp_path: Path) -> None:
    backend, content = store
    cache = ChunkCache(tmp_path / "cache", memory_bytes=2 * CS, disk_bytes=3000)
    with ChunkedSource(backend, read_manifest(backend, "vm"), cache,
                       owns_backend=False) as source:
        for i in range(8):
            buf = bytearray(CS)
            source.read_into(i * CS, memoryview(buf))
            assert buf == content[i * CS:(i + 1) * CS]
            assert cache.memory_used <= 2 * CS
    assert 0 < cache.disk_used() <= 3000


_READER = """
import sys
from pagein.snapshot.store import open_store_source
url, cache, expect = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read()
for rep in range(3):
    with open_store_source("dir", url, cache_dir=cache, cache_disk_bytes=200_000,
                           cache_memory_bytes=65536) as s:
        buf = bytearray(s.size)
        s.read_into(0, memoryview(buf))
        assert buf == expect, "wrong bytes"
print("ok")
"""


def test_processes_share_one_cache_dir(store: tuple[LocalBackend, bytes],
                                       tmp_path: Path) -> None:
    backend, _ = store
    procs = [subprocess.Popen([sys.executable, "-c", _READER, f"{backend.root}/vm",
                               str(tmp_path / "shared"), str(tmp_path / "mem")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
            assert out.strip() == b"ok"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not [p for p in (tmp_path / "shared").rglob(".tmp.*")]


def test_options_are_checked(store: tuple[LocalBackend, bytes]) -> None:
    backend, _ = store
    with pytest.raises(SourceError, match=r"unknown store option.*cache_size"):
        open_store_source("dir", f"{backend.root}/vm", cache_size=5)
    with pytest.raises(SourceError, match="workers=0 must be a positive integer"):
        open_store_source("dir", f"{backend.root}/vm", workers=0)
    with pytest.raises(SourceError, match="no snapshot 'nope'"):
        open_store_source("dir", f"{backend.root}/nope", cache_dir=None)


def test_read_outside_snapshot_is_refused(store: tuple[LocalBackend, bytes]) -> None:
    backend, content = store
    with (open_store_source("dir", f"{backend.root}/vm", cache_dir=None) as source,
          pytest.raises(SourceError, match="outside snapshot")):
        source.read_into(len(content) - 10, memoryview(bytearray(20)))


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pagein.snapshot.store.cache import default_cache_dir

    monkeypatch.setenv("PAGEIN_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    assert os.fspath(default_cache_dir()).endswith("x")
