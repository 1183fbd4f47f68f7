"""``pagein serve`` restoring a Firecracker-faithful client, every byte checked."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    PAGE,
    ServerProc,
    client,
    finish,
    hugepages,
    make_snapshot,
    start_server,
    touch_args,
)

pytestmark = pytest.mark.kernel

SIZE = 4 << 20
# Two regions at non-trivial offsets, with a gap between them in the file.
REGIONS = [(0x10000, 1 << 20), (0x180000, 2 << 20)]


@pytest.fixture
def snap(tmp_path: Path) -> tuple[str, bytes]:
    path = str(tmp_path / "mem.snap")
    return path, make_snapshot(path, SIZE)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[ServerProc]]:
    servers: list[ServerProc] = []
    yield servers
    for s in servers:
        s.stop()


def _pages(regions: list[tuple[int, int]], page: int = PAGE) -> int:
    return sum(size // page for _, size in regions)


def _holes(data: bytes, regions: list[tuple[int, int]]) -> int:
    return sum(1 for off, size in regions for p in range(off, off + size, PAGE)
               if not any(data[p:p + PAGE]))


@pytest.mark.parametrize("generation", ["current", "legacy-kib", "original"])
def test_each_payload_generation_restores_every_byte(
        tmp_path: Path, snap: tuple[str, bytes], server_factory: list[ServerProc],
        generation: str) -> None:
    path, data = snap
    server = start_server(str(tmp_path), path)
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, REGIONS, "--generation", generation)))
    assert rc == 0, res
    assert res["pages"] == 4 * _pages(REGIONS)  # 4 threads each read every page
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    # Every page installed exactly once although 4 threads raced on each.
    assert total["pages"] == _pages(REGIONS)
    assert total["zero_pages"] == _holes(data, REGIONS)
    assert total["bytes_copied"] == (_pages(REGIONS) - _holes(data, REGIONS)) * PAGE


@pytest.mark.parametrize("strategy", ["readahead", "populate-all"])
def test_strategies_copy_each_page_once(tmp_path: Path, snap: tuple[str, bytes],
                                        server_factory: list[ServerProc], strategy: str) -> None:
    path, _data = snap
    window = ["--readahead-size", "64K"] if strategy == "readahead" else []  # else refused
    server = start_server(str(tmp_path), path, "--strategy", strategy, *window)
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, REGIONS, "--threads", "2")))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    assert total["pages"] == _pages(REGIONS)
    # Bulk fills copy short holes with their neighbours (zeros from the file).
    assert total["bytes_copied"] + total["zero_pages"] * PAGE == _pages(REGIONS) * PAGE
    if strategy == "readahead":
        assert total["bytes_readahead"] > 0
        assert total["faults"] < _pages(REGIONS)


def test_many_regions_payload_larger_than_1kib(tmp_path: Path, snap: tuple[str, bytes],
                                               server_factory: list[ServerProc]) -> None:
    path, _ = snap
    regions = [(i * 0x10000, 0x8000) for i in range(48)]  # JSON of about 5 KiB
    server = start_server(str(tmp_path), path)
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, regions, "--threads", "2")))
    assert rc == 0, res
    assert res["pages"] == 2 * _pages(regions)


def test_balloon_before_touch_reads_zeros_not_snapshot(
        tmp_path: Path, snap: tuple[str, bytes], server_factory: list[ServerProc]) -> None:
    path, _ = snap
    server = start_server(str(tmp_path), path, "--strategy", "populate-all")
    server_factory.append(server)
    args = touch_args(server, path, REGIONS, "--pre-balloon", "0x40000:0x40000")
    rc, res = finish(client(*args))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    assert total["removes"] >= 1


def test_balloon_inflate_deflate_while_faulting(
        tmp_path: Path, snap: tuple[str, bytes], server_factory: list[ServerProc]) -> None:
    path, _ = snap
    server = start_server(str(tmp_path), path, "--strategy", "populate-all",
                          "--chunk-size", "64K")
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, REGIONS, "--balloon-rounds", "4")))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    assert total["removes"] >= 5


@pytest.mark.hugetlb
def test_hugetlb_regions_served_whole(tmp_path: Path, server_factory: list[ServerProc]) -> None:
    with hugepages(4) as ok:
        if not ok:
            pytest.skip("needs 4 free 2 MiB pages: raise vm.nr_hugepages")
        _hugetlb_restore(tmp_path, server_factory)


def _hugetlb_restore(tmp_path: Path, server_factory: list[ServerProc]) -> None:
    path = str(tmp_path / "mem.snap")
    huge = 2 << 20
    data = make_snapshot(path, 4 * huge, hole_every=0)
    # Region 1 is one huge page of zeros in the file: served by copying a zero buffer.
    with open(path, "r+b") as f:
        f.seek(3 * huge)
        f.write(bytes(huge))
    assert data
    server = start_server(str(tmp_path), path)
    server_factory.append(server)
    regions = [(0, 2 * huge), (3 * huge, huge)]
    # The second huge page of region 0 is ballooned before any touch: it must read zeros
    # (a copy from a zero buffer: hugetlbfs has no zero page).
    rc, res = finish(client(*touch_args(server, path, regions, "--hugetlb", "--generation",
                                        "legacy-kib", "--pre-balloon", f"{huge}:{huge}")))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    assert total["pages"] == 3 and total["zero_pages"] == 1 and total["removes"] == 1
    assert total["bytes_copied"] == 2 * huge


def test_server_keeps_serving_after_peer_exit(tmp_path: Path, snap: tuple[str, bytes],
                                              server_factory: list[ServerProc]) -> None:
    path, _ = snap
    server = start_server(str(tmp_path), path)
    server_factory.append(server)
    for _ in range(3):  # each client exits (EOF ends its session); the next is served
        rc, res = finish(client(*touch_args(server, path, REGIONS[:1], "--threads", "1")))
        assert rc == 0, res
    assert server.proc.poll() is None
    server.stop()
    vms = server.stats()["vms"]
    assert isinstance(vms, list)
    assert [v["state"] for v in vms] == ["peer exited"] * 3
    assert os.path.exists(server.stats_path)


def test_remap_and_unmap_are_followed(tmp_path: Path, snap: tuple[str, bytes],
                                      server_factory: list[ServerProc]) -> None:
    path, _ = snap
    server = start_server(str(tmp_path), path, "--strategy", "populate-all",
                          "--chunk-size", "16K")
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, REGIONS, "--remap")))
    assert rc == 0, res
    server.stop()
    vm = server.stats()["vms"][0]  # type: ignore[index]
    assert vm["remaps"] == 1 and vm["unmaps"] >= 1
    assert "ERROR" not in server.log()
    assert vm["state"] == "peer exited"


def test_populate_all_maps_zero_pages_for_large_holes(tmp_path: Path,
                                                       server_factory: list[ServerProc]) -> None:
    path = str(tmp_path / "mem.snap")
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:  # 1 MiB of data, then a 3 MiB hole
        f.write(data)
        f.truncate(SIZE)
    server = start_server(str(tmp_path), path, "--strategy", "populate-all")
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, [(0, SIZE)], "--threads", "1")))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict)
    assert total["zero_pages"] == (3 << 20) // PAGE
    assert total["bytes_copied"] == 1 << 20


def test_serve_from_a_chunk_store_source(tmp_path: Path, snap: tuple[str, bytes],
                                         server_factory: list[ServerProc]) -> None:
    """--source dir:///store/name: a store source (no address, read_into only), every byte."""
    path, _ = snap
    store = tmp_path / "store"
    env = {**os.environ, "PAGEIN_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "pagein", "store", "push", "-q", "--store",
                    f"dir://{store}", "--chunk-size", "64K", path, "snap1"],
                   check=True, env=env, timeout=120)
    server = start_server(str(tmp_path), path, "--strategy", "readahead",
                          source=f"dir://{store}/snap1", env=env)
    server_factory.append(server)
    rc, res = finish(client(*touch_args(server, path, REGIONS, "--threads", "2")))
    assert rc == 0, res
    server.stop()
    total = server.stats()["total"]
    assert isinstance(total, dict) and total["pages"] == _pages(REGIONS)
    assert server.stats()["source"] != path
