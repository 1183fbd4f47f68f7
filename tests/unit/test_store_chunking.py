"""Chunking round trip against a simple oracle: push a file, read it back any way."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagein.snapshot.store import ops
from pagein.snapshot.store.backend import LocalBackend
from pagein.snapshot.store.cache import ChunkCache
from pagein.snapshot.store.chunker import digest, iter_chunks
from pagein.snapshot.store.layout import read_manifest
from pagein.snapshot.store.source import ChunkedSource

PAGE = 4096


@st.composite
def memory_images(draw: st.DrawFn) -> tuple[bytes, int]:
    """A memory-like file: zero pages, random pages and repeats of earlier pages."""
    chunk_size = 1 << draw(st.integers(16, 17))
    pages = draw(st.integers(0, 3 * chunk_size // PAGE + 5))
    seed_pages = [bytes([i + 1]) * 64 + i.to_bytes(8, "little") * 3 for i in range(4)]
    out = bytearray()
    for _ in range(pages):
        kind = draw(st.sampled_from(["zero", "zero", "fill", "repeat"]))
        if kind == "zero":
            out += bytes(PAGE)
        elif kind == "fill":
            out += draw(st.sampled_from(seed_pages)).ljust(PAGE, b"\0")
        else:
            out += out[-chunk_size:][:PAGE] if out else bytes(PAGE)
    tail = draw(st.integers(0, PAGE - 1))  # a last chunk that is not page-aligned
    out += bytes([7]) * tail
    return bytes(out), chunk_size


def oracle_chunks(data: bytes, chunk_size: int) -> list[bytes | None]:
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    return [None if c.count(0) == len(c) else c for c in chunks]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(memory_images(), st.data())
def test_push_read_pull_round_trip(image: tuple[bytes, int], data: st.DataObject) -> None:
    content, chunk_size = image
    with tempfile.TemporaryDirectory() as tmp:
        src_file = Path(tmp, "mem")
        src_file.write_bytes(content)
        backend = LocalBackend(Path(tmp, "store"), create=True)
        stats = ops.push(backend, src_file, "snap", chunk_size=chunk_size, workers=2)

        expect = oracle_chunks(content, chunk_size)
        assert stats.chunks == len(expect)
        assert stats.zero_chunks == sum(c is None for c in expect)
        assert stats.unique_chunks == len({c for c in expect if c is not None})
        assert stats.bytes_in == len(content)
        stored = {d for o in backend.list("chunks/") if (d := o.key.split("/")[-1][:-4])}
        assert stored == {digest(c) for c in expect if c is not None}

        manifest = read_manifest(backend, "snap")
        cache = ChunkCache(Path(tmp, "cache"), memory_bytes=2 * chunk_size)
        with ChunkedSource(backend, manifest, cache, workers=3) as source:
            assert source.size == len(content)
            assert source.block_size == chunk_size
            for _ in range(8):
                off = data.draw(st.integers(0, len(content)))
                n = data.draw(st.integers(0, len(content) - off))
                buf = bytearray(b"\xaa" * n)
                source.read_into(off, memoryview(buf))
                assert bytes(buf) == content[off:off + n]
                # Zero extents lie inside the range and are zeros in the oracle.
                for zo, zn in source.zero_extents(off, n):
                    assert off <= zo and zo + zn <= off + n
                    assert content[zo:zo + zn].count(0) == zn
        ops.pull(backend, "snap", Path(tmp, "out"))
        assert Path(tmp, "out").read_bytes() == content


def test_zero_extents_cover_every_zero_chunk(tmp_path: Path) -> None:
    cs = 64 << 10
    content = bytes(cs) * 2 + b"x" * cs + bytes(cs) + b"y" * 10
    (tmp_path / "mem").write_bytes(content)
    backend = LocalBackend(tmp_path / "store", create=True)
    ops.push(backend, tmp_path / "mem", "z", chunk_size=cs)
    with ChunkedSource(backend, read_manifest(backend, "z"), ChunkCache(None)) as source:
        assert source.zero_extents(0, len(content)) == [(0, 2 * cs), (3 * cs, cs)]
        assert source.zero_extents(100, cs) == [(100, cs)]
        assert source.zero_extents(2 * cs, cs) == []


def test_sparse_file_holes_are_skipped_and_zero(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # 64 MiB of hole
        f.seek(40 << 20)
        f.write(b"data")
    chunks = list(iter_chunks(path, 1 << 20))
    assert len(chunks) == 64
    assert [c.index for c in chunks if c.data is not None] == [40]
    assert all(c.length == 1 << 20 for c in chunks)


def test_identical_snapshots_share_every_chunk(tmp_path: Path) -> None:
    content = os.urandom(300_000) + bytes(200_000)
    (tmp_path / "mem").write_bytes(content)
    backend = LocalBackend(tmp_path / "store", create=True)
    first = ops.push(backend, tmp_path / "mem", "a", chunk_size=64 << 10)
    second = ops.push(backend, tmp_path / "mem", "b", chunk_size=64 << 10)
    assert first.new_chunks == first.unique_chunks > 0
    assert second.new_chunks == 0 and second.bytes_out == 0
    assert second.dedup_savings == 1.0
