"""A working set pushed with a snapshot and prefetched by ``pagein serve --source URL/NAME
--strategy working-set`` on a host that has no local copy: real SeaweedFS (and a directory
store), the real fault server, the Firecracker-faithful client checking every byte."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from seaweed_server import BUCKET, Weed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagein.errors import IntegrityError
from pagein.snapshot import workingset
from pagein.snapshot.raw import RawFileSource
from pagein.snapshot.store import open_store_source, ops
from pagein.snapshot.store.layout import StoreOptions, open_backend, working_set_key
from serve_harness import PAGE, client, finish, make_snapshot, start_server, touch_args

pytestmark = [pytest.mark.s3, pytest.mark.kernel]

SIZE = 2 << 20
REGIONS = [(0x10000, 512 << 10), (0x100000, 1 << 20)]
CS = "64K"


def _pagein(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagein", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)


def _record(mem: str, ws: str) -> int:
    """Write a working set of the first region's pages (backwards: a real touch order)."""
    first, length = REGIONS[0]
    pages = [first + i * PAGE for i in reversed(range(length // PAGE))]
    with RawFileSource(mem) as src:
        return workingset.write(ws, src, pages)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store URL (S3 on the session SeaweedFS, or a directory)."""
    monkeypatch.setenv("PAGEIN_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "dir":
        return f"dir://{tmp_path / 'store'}"
    weed: Weed = request.getfixturevalue("weed_server")
    # Child processes (push, serve) find the endpoint the standard way.
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed.endpoint)
    return f"s3://{BUCKET}/ws-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("store", ["s3", "dir"], indirect=True)
def test_serve_prefetches_the_stored_working_set(store: str, tmp_path: Path) -> None:
    mem, ws = str(tmp_path / "mem"), str(tmp_path / "ws")
    make_snapshot(mem, SIZE)
    assert _record(mem, ws) > 0
    r = _pagein("store", "push", mem, "vm", "--store", store, "--chunk-size", CS,
                "--working-set", ws, "-q")
    assert r.returncode == 0, r.stderr
    ls = _pagein("store", "ls", "--store", store)
    assert ls.returncode == 0 and "working set" in ls.stdout, ls.stderr
    assert [ln.split()[-3] for ln in ls.stdout.splitlines() if ln.startswith("vm ")] == ["yes"]
    os.unlink(ws)  # this host never had it: it must come from the store

    server = start_server(str(tmp_path), mem, "--exit-after", "1", "--strategy", "working-set",
                          "--then", "on-demand", source=f"{store}/vm")
    try:
        rc, res = finish(client(*touch_args(server, mem, REGIONS)))
        assert rc == 0 and res["ok"], res  # every touched byte equals the snapshot's
        server.proc.wait(30)
        total = server.stats()["total"]
    finally:
        server.stop()
    assert isinstance(total, dict)
    recorded = REGIONS[0][1]
    # The recorded region arrived by prefetch (less its zero pages), not by faults.
    assert total["bytes_background"] >= recorded * 3 // 4, total
    assert total["faults"] < (REGIONS[1][1] + recorded // 4) // PAGE, total
    cached = list((tmp_path / "cache" / "working-sets").glob("*.ws"))
    assert len(cached) == 1


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_foreign_working_set_is_refused_and_rm_removes_it(store: str, tmp_path: Path) -> None:
    mem, other, ws = str(tmp_path / "mem"), str(tmp_path / "other"), str(tmp_path / "ws")
    make_snapshot(mem, SIZE)
    make_snapshot(other, SIZE, seed=99)
    _record(other, ws)
    r = _pagein("store", "push", mem, "vm", "--store", store, "--chunk-size", CS,
                "--working-set", ws, "-q")
    assert r.returncode == 1 and "does not belong to" in r.stderr, r.stderr
    assert ws in r.stderr and mem in r.stderr
    backend = open_backend(store, StoreOptions(endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
    try:
        assert "vm" not in _pagein("store", "ls", "--store", store).stdout  # nothing pushed
        assert _pagein("store", "push", mem, "vm", "--store", store, "--chunk-size", CS,
                       "-q").returncode == 0
        r = _pagein("store", "push-working-set", "vm", ws, "--store", store)
        assert r.returncode == 1 and "does not belong to" in r.stderr, r.stderr
        assert backend.head(working_set_key("vm")) is None
        _record(mem, ws)
        r = _pagein("store", "push-working-set", "vm", ws, "--store", store)
        assert r.returncode == 0, r.stderr
        assert backend.head(working_set_key("vm")) is not None
        # Re-pushing the snapshot without one drops the old set (it was for other bytes).
        assert _pagein("store", "push", mem, "vm", "--store", store, "--chunk-size", CS,
                       "-q").returncode == 0
        assert backend.head(working_set_key("vm")) is None
        _pagein("store", "push-working-set", "vm", ws, "--store", store)
        assert _pagein("store", "gc", "--store", store, "--grace", "0").returncode == 0
        assert backend.head(working_set_key("vm")) is not None  # gc leaves it alone
        assert _pagein("store", "rm", "vm", "--store", store).returncode == 0
        assert backend.head(working_set_key("vm")) is None
    finally:
        backend.close()


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_working_set_strategy_without_a_stored_set_names_the_snapshot(
        store: str, tmp_path: Path) -> None:
    mem = str(tmp_path / "mem")
    make_snapshot(mem, SIZE)
    assert _pagein("store", "push", mem, "bare", "--store", store, "--chunk-size", CS,
                   "-q").returncode == 0
    with pytest.raises(RuntimeError) as e:
        server = start_server(str(tmp_path), mem, "--strategy", "working-set",
                              source=f"{store}/bare")
        server.stop()
    assert f"snapshot {store}/bare has no working set in its store" in str(e.value)
    assert not (tmp_path / "fc.sock").exists()  # refused before listening


def test_working_set_path_downloads_once_and_refetches_a_damaged_copy(tmp_path: Path) -> None:
    mem, ws = str(tmp_path / "mem"), str(tmp_path / "ws")
    make_snapshot(mem, SIZE)
    _record(mem, ws)
    good = Path(ws).read_bytes()
    store = tmp_path / "store"
    backend = open_backend(f"dir://{store}", create=True)
    ops.push(backend, mem, "vm", chunk_size=64 << 10, working_set=ws)
    ops.push(backend, mem, "bare", chunk_size=64 << 10)
    backend.close()
    cache = tmp_path / "cache"
    with open_store_source("dir", f"{store}/vm", cache_dir=str(cache)) as src:
        path = src.working_set_path()
        assert path is not None and Path(path).parent == cache / "working-sets"
        assert Path(path).read_bytes() == good
        damaged = bytearray(good)
        damaged[-1] ^= 1
        Path(path).write_bytes(bytes(damaged))
        assert src.working_set_path() == path and Path(path).read_bytes() == good
        (store / "working-sets" / "vm.ws").write_bytes(bytes(damaged))
        Path(path).unlink()
        with pytest.raises(IntegrityError, match="is corrupted"):
            src.working_set_path()
        assert not list((cache / "working-sets").iterdir())  # no temp file left behind
    with open_store_source("dir", f"{store}/bare", cache_dir=None) as src:
        assert src.working_set_path() is None
    (store / "working-sets" / "vm.ws").write_bytes(good)
    with open_store_source("dir", f"{store}/vm", cache_dir=None) as src:
        path = src.working_set_path()
        assert path is not None and Path(path).read_bytes() == good
    assert not os.path.exists(path)  # without a disk cache: a temp dir, gone at close
