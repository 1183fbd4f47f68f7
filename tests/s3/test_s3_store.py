"""The store against a real SeaweedFS: round trip, integrity, missing chunks, outages, gc."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from seaweed_server import BUCKET, Weed, free_ports, start_weed

from pagein.errors import IntegrityError, SourceError
from pagein.snapshot.open import open_source
from pagein.snapshot.store import open_store_source, ops
from pagein.snapshot.store.backend import RetryPolicy
from pagein.snapshot.store.layout import StoreOptions, chunk_key, open_backend, read_manifest

pytestmark = pytest.mark.s3

CS = 64 << 10


def make_image(path: Path, seed: int, chunks: int = 16) -> bytes:
    """A compressible, partly zero, partly shared memory-like image."""
    base, own = random.Random(0), random.Random(seed)
    out = bytearray()
    for i in range(chunks):
        if i % 5 == 4:
            out += bytes(CS)
        else:
            rnd = base if i % 2 == 0 else own
            out += rnd.randbytes(CS // 8) * 8
    path.write_bytes(out)
    return bytes(out)


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests do not see each other's snapshots."""
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store_url(prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}"


def opts(server: Weed, attempts: int = 5) -> StoreOptions:
    return StoreOptions(endpoint_url=server.endpoint, retry=RetryPolicy(attempts=attempts))


def test_push_serve_pull_round_trip(weed_server: Weed, store_url: str, tmp_path: Path) -> None:
    content = make_image(tmp_path / "mem", 1)
    backend = open_backend(store_url, opts(weed_server))
    stats = ops.push(backend, tmp_path / "mem", "vm1", chunk_size=CS)
    assert stats.zero_chunks == 3 and stats.bytes_in == len(content)
    assert stats.compression_ratio > 4  # each chunk is one 8 KiB block repeated
    again = ops.push(backend, tmp_path / "mem", "vm2", chunk_size=CS)
    assert again.new_chunks == 0 and again.dedup_savings == 1.0
    assert [r.name for r in ops.list_snapshots(backend)] == ["vm1", "vm2"]

    with open_source(f"{store_url}/vm1", endpoint_url=weed_server.endpoint,
                     cache_dir=tmp_path / "cache") as source:
        assert source.block_size == CS and source.size == len(content)
        buf = bytearray(len(content))
        source.read_into(0, memoryview(buf))
        assert buf == content
        piece = bytearray(10_000)
        source.read_into(3 * CS - 5000, memoryview(piece))
        assert piece == content[3 * CS - 5000:3 * CS + 5000]
        assert source.zero_extents(0, len(content)) == [(i * CS, CS) for i in (4, 9, 14)]
    ops.pull(backend, "vm2", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == content
    ops.remove(backend, "vm1")
    ops.remove(backend, "vm2")
    # S3 LastModified has 1 s resolution and gc keeps anything not strictly older
    # than its own marker: let the store's clock tick once so every chunk is older.
    time.sleep(1.1)
    gone = ops.gc(backend, grace_seconds=0)
    assert gone.chunks_deleted == stats.unique_chunks
    assert not list(backend.list(""))


def test_endpoint_from_environment(weed_server: Weed, store_url: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed_server.endpoint)
    content = make_image(tmp_path / "mem", 2, chunks=4)
    backend = open_backend(store_url)
    ops.push(backend, tmp_path / "mem", "envsnap", chunk_size=CS)
    with open_store_source("s3", f"{store_url[5:]}/envsnap", cache_dir=None) as source:
        buf = bytearray(len(content))
        source.read_into(0, memoryview(buf))
        assert buf == content


def test_corrupted_chunk_object_fails_before_any_byte(weed_server: Weed, s3: Any,
                                                      prefix: str, store_url: str,
                                                      tmp_path: Path) -> None:
    make_image(tmp_path / "mem", 3, chunks=6)
    backend = open_backend(store_url, opts(weed_server))
    ops.push(backend, tmp_path / "mem", "vm", chunk_size=CS)
    ref = read_manifest(backend, "vm").chunks[1]
    assert ref is not None
    key = f"{prefix}/{chunk_key(ref.digest)}"
    raw = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    raw[-3] ^= 0x40  # flip one bit of the stored object in the store itself
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(raw))
    with open_store_source("s3", f"{store_url[5:]}/vm", endpoint_url=weed_server.endpoint,
                           cache_dir=tmp_path / "cache") as source:
        buf = bytearray(b"\x5a" * (2 * CS))
        with pytest.raises(IntegrityError, match=rf"chunk 1 .* of snapshot {store_url}/vm"):
            source.read_into(0, memoryview(buf))
        assert buf == b"\x5a" * (2 * CS)
    assert not list((tmp_path / "cache").rglob(f"{ref.digest}*"))  # never cached
    assert ops.verify(backend, "vm") == [1]


def test_missing_chunk_object_is_source_error(weed_server: Weed, s3: Any, prefix: str,
                                              store_url: str, tmp_path: Path) -> None:
    make_image(tmp_path / "mem", 4, chunks=6)
    backend = open_backend(store_url, opts(weed_server))
    ops.push(backend, tmp_path / "mem", "vm", chunk_size=CS)
    ref = read_manifest(backend, "vm").chunks[3]
    assert ref is not None
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/{chunk_key(ref.digest)}")
    with (open_store_source("s3", f"{store_url[5:]}/vm", endpoint_url=weed_server.endpoint,
                            cache_dir=None) as source,
          pytest.raises(SourceError, match=r"chunk 3 .* is missing from the store")):
        source.read_into(3 * CS, memoryview(bytearray(4096)))
    with pytest.raises(SourceError, match="missing"):
        ops.pull(backend, "vm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_port_gives_one_clear_error(s3_env: dict[str, str], tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(SourceError) as info:
        open_store_source("s3", f"{BUCKET}/vm", endpoint_url=endpoint, retries=3,
                          cache_dir=None)
    msg = str(info.value)
    assert f"S3 store {endpoint} is unreachable" in msg
    assert "failed 3 times" in msg and "AWS_ENDPOINT_URL" in msg


def test_bad_credentials_are_named(weed_server: Weed, store_url: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(SourceError, match="AWS_SECRET_ACCESS_KEY"):
        open_store_source("s3", f"{store_url[5:]}/vm", endpoint_url=weed_server.endpoint,
                          cache_dir=None)


def test_store_killed_mid_restore(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A private server: serve some chunks, kill it, the next fetch fails clearly."""
    workdir = Path(tempfile.mkdtemp(prefix="pagein-weed-kill-"))
    server = start_weed(workdir)
    try:
        content = make_image(tmp_path / "mem", 5, chunks=8)
        store_url = f"s3://{BUCKET}/kill"
        ops.push(open_backend(store_url, opts(server)), tmp_path / "mem", "vm", chunk_size=CS)
        source = open_store_source("s3", f"{BUCKET}/kill/vm", endpoint_url=server.endpoint,
                                   cache_dir=None, retries=3)
        with source:
            buf = bytearray(CS)
            source.read_into(0, memoryview(buf))
            assert buf == content[:CS]
            server.stop()
            with pytest.raises(SourceError, match=rf"S3 store {server.endpoint} is unreachable"):
                source.read_into(CS, memoryview(buf))
            source.read_into(0, memoryview(buf))  # cached chunks still serve
            assert buf == content[:CS]
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_gc_concurrent_with_pushes_loses_nothing(weed_server: Weed, store_url: str,
                                                 tmp_path: Path) -> None:
    backend = open_backend(store_url, opts(weed_server))
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = [0]

    def collector() -> None:
        gc_backend = open_backend(store_url, opts(weed_server))
        try:
            while not stop.is_set():
                ops.gc(gc_backend, grace_seconds=0)
                runs[0] += 1
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=collector)
    worker.start()
    images = {}
    try:
        for i in range(5):
            name = f"vm{i}"
            images[name] = make_image(tmp_path / name, seed=10 + i, chunks=12)
            ops.push(backend, tmp_path / name, name, chunk_size=CS)
            if i >= 2:
                ops.remove(backend, f"vm{i - 2}")
                del images[f"vm{i - 2}"]
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors and runs[0] > 0
    for name, content in images.items():
        ops.pull(backend, name, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == content, name
