"""``--share-pages``: clones map their memory from the server's page cache of the snapshot.

Each client is the Firecracker-faithful client (tests/fcclient.py) as its own process,
with ``--share-pages``: it asks ``pagein serve`` for the cache memfd, maps its regions
MAP_PRIVATE from it, registers them MISSING|MINOR and sends the usual handshake. Every
page it reads is compared with the memory file; its memory is counted from its own
``/proc/self/smaps`` (private bytes vs resident bytes of the guest regions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pagein.errors import HandlerError
from pagein.serve.engine import EngineName
from pagein.serve.pagecache import request_page_cache
from serve_harness import (
    ServerProc,
    client,
    finish,
    hugepages,
    make_snapshot,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel
MIB = 1 << 20
SIZE = 4 * MIB
LAYOUT = [(0, 2 * MIB), (2 * MIB, 2 * MIB)]
PAGES = SIZE // 4096
HOLES = PAGES // 8  # make_snapshot: every 8th page is a hole


@pytest.fixture
def snap(tmp_path: str) -> str:
    path = os.path.join(str(tmp_path), "snap.mem")
    make_snapshot(path, SIZE)
    return path


@pytest.fixture
def server(tmp_path: str, snap: str) -> Iterator[ServerProc]:
    s = start_server(str(tmp_path), snap, "--workers", "2", "--page-cache-keep", "600")
    try:
        yield s
    finally:
        s.stop()


def _holding(server: ServerProc, snap: str, *extra: str) -> subprocess.Popen[str]:
    """A clone that touches every page, reports, and keeps running until its stdin closes."""
    return client(*touch_args(server, snap, LAYOUT, "--hold", "--threads", "2", *extra),
                  stdin=subprocess.PIPE)


def _report(proc: subprocess.Popen[str]) -> dict[str, object]:
    """The JSON line a holding clone prints once it has touched everything."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            doc: dict[str, object] = json.loads(line)
            return doc
    raise AssertionError(f"the client exited ({proc.wait()}) without a report")


def _release(*procs: subprocess.Popen[str]) -> None:
    """End holding clones (every one, even when an earlier one failed), then check."""
    codes = []
    for p in procs:
        try:
            codes.append(finish(p)[0])
        except AssertionError:  # timed out: finish() killed it
            codes.append(None)
    assert codes == [0] * len(procs)


def _as_int(v: object) -> int:
    assert isinstance(v, int)
    return v


def test_clones_read_the_snapshot_and_share_its_clean_pages(server: ServerProc,
                                                            snap: str) -> None:
    clones = [_holding(server, snap, "--share-pages", "--seed", str(i)) for i in range(3)]
    private = _holding(server, snap)  # today's private uffd restore, side by side
    try:
        reports = [_report(p) for p in clones]
        baseline = _report(private)
        for r in reports:
            assert r["ok"] and r["pages"] == 2 * PAGES, r  # two threads read every page
            # Every clean page is the cache's: nothing of the snapshot is private.
            assert r["anon_bytes"] == 0, r
            assert _as_int(r["rss_bytes"]) >= (PAGES - HOLES) * 4096, r
        assert baseline["ok"] and baseline["anon_bytes"] == (PAGES - HOLES) * 4096, baseline
        doc = server.fresh_stats()
        caches = doc["page_caches"]
        assert isinstance(caches, list) and len(caches) == 1
        (cache,) = caches
        # Filled once for three clones: the data pages (holes are private zero pages).
        assert cache == {"page_size": 4096, "size_bytes": SIZE, "pages": PAGES,
                         "pages_present": PAGES - HOLES,
                         "bytes_present": (PAGES - HOLES) * 4096, "vms": 3}
        # Shared clones are served by the engine asked for (native unless
        # PAGEIN_ENGINE=python), like every other VM: the C core fills the cache too.
        vms = doc["vms"]
        assert isinstance(vms, list)
        assert [v["engine"] for v in vms] == [EngineName.default().value] * 4, vms
    finally:
        _release(*clones, private)
    assert "sharing the page cache" in server.log()


def test_a_clones_writes_never_reach_another_clone_or_the_cache(server: ServerProc,
                                                                snap: str) -> None:
    writer = _holding(server, snap, "--share-pages", "--write")
    try:
        w = _report(writer)
        # Its writes are its own (fcclient re-reads each written page): private copies.
        assert w["ok"] and _as_int(w["written"]) > 0, w
        assert w["anon_bytes"] == _as_int(w["written"]) * 4096, w
        reader = _holding(server, snap, "--share-pages")
        try:
            r = _report(reader)
            assert r["ok"] and r["anon_bytes"] == 0, r  # the snapshot, byte for byte
        finally:
            _release(reader)
    finally:
        _release(writer)


def test_remove_in_one_clone_reads_zeros_there_and_leaves_the_others_alone(
        server: ServerProc, snap: str) -> None:
    reader = _holding(server, snap, "--share-pages")
    try:
        assert _report(reader)["ok"]
        # The balloon clone drops half of region 0 again and again while faulting: it
        # must read zeros there (never the cache's snapshot page), the others' pages stay.
        code, b = finish(client(*touch_args(server, snap, LAYOUT, "--share-pages",
                                            "--balloon-rounds", "3")))
        assert code == 0 and b["ok"], b
        again = _holding(server, snap, "--share-pages")
        try:
            assert _report(again)["ok"]
        finally:
            _release(again)
    finally:
        _release(reader)


@pytest.mark.parametrize(("bad", "why"), [
    ("offset", "not at its file offset 0x0"),
    ("shared", "must be mapped MAP_PRIVATE"),
    ("missing-only", "must be registered MISSING|MINOR"),
])
def test_a_wrongly_mapped_cache_is_refused_before_the_guest_runs(
        server: ServerProc, snap: str, bad: str, why: str) -> None:
    code, _ = finish(client(*touch_args(server, snap, LAYOUT, "--share-pages",
                                        "--share-bad", bad)))
    assert code == -signal.SIGKILL  # --on-bad-handshake kill: it never ran a page
    wait_for(lambda: why in server.log(), 10, "the bad-handshake line")
    assert "bad handshake field regions[0].base_host_virt_addr" in server.log()


def test_the_vmm_refuses_a_cache_of_a_smaller_snapshot_or_a_bad_page_size(
        server: ServerProc) -> None:
    with pytest.raises(HandlerError, match="smaller than this VM's memory"):
        request_page_cache(server.socket_path, 4096, need_bytes=SIZE + 4096)
    with pytest.raises(HandlerError, match=r"page_size=12288.*must be one of 4096, 2097152"):
        request_page_cache(server.socket_path, 12288, need_bytes=SIZE)
    got = request_page_cache(server.socket_path, 4096, need_bytes=SIZE)
    try:
        assert got.size_bytes == SIZE and got.page_size == 4096
    finally:
        got.memfd.close()


def test_the_cache_is_kept_for_page_cache_keep_after_its_last_vm(tmp_path: str,
                                                                  snap: str) -> None:
    s = start_server(str(tmp_path), snap, "--workers", "1", "--page-cache-keep", "0.3")
    try:
        code, r = finish(client(*touch_args(s, snap, LAYOUT, "--share-pages")))
        assert code == 0 and r["ok"]
        wait_for(lambda: "page cache of 4096-byte pages dropped" in s.log(), 10,
                 "the idle cache to be dropped")
        assert s.fresh_stats()["page_caches"] == []
        code, r = finish(client(*touch_args(s, snap, LAYOUT, "--share-pages")))
        assert code == 0 and r["ok"], r  # a new cache, filled again
    finally:
        s.stop()


@pytest.mark.hugetlb
def test_hugetlb_clones_share_2mib_pages(tmp_path: str, snap: str) -> None:
    # The cache (2 pages, reserved by the server) and the zeros of a balloon (private).
    with hugepages(4) as ok:
        assert ok, "could not reserve 2 MiB pages"
        s = start_server(str(tmp_path), snap, "--workers", "2")
        try:
            clones = [_holding(s, snap, "--share-pages", "--hugetlb") for _ in range(2)]
            try:
                a, b = (_report(p) for p in clones)
                assert a["ok"] and b["ok"], (a, b)
                # The same two physical huge pages back both clones: the cache's.
                pfns = a["pfns"]
                assert isinstance(pfns, list) and len(set(pfns)) == 2 and 0 not in pfns, a
                assert b["pfns"] == pfns, (a, b)
                caches = s.fresh_stats()["page_caches"]
                assert isinstance(caches, list)
                assert [(c["page_size"], c["pages_present"], c["vms"]) for c in caches] == \
                    [(2 * MIB, 2, 2)]
            finally:
                _release(*clones)
        finally:
            s.stop()


@pytest.mark.parametrize("strategy", ["readahead", "populate-all"])
def test_clones_share_pages_from_a_chunk_store_with_any_strategy(tmp_path: str, snap: str,
                                                                 strategy: str) -> None:
    # A store source has no address to copy from: the cache is filled with read_into,
    # by faults, readahead windows and the background plan alike.
    store = os.path.join(str(tmp_path), "store")
    env = {**os.environ, "PAGEIN_CACHE_DIR": os.path.join(str(tmp_path), "cache")}
    subprocess.run([sys.executable, "-m", "pagein", "store", "push", "-q", "--store",
                    f"dir://{store}", "--chunk-size", "64K", snap, "snap1"],
                   check=True, env=env, timeout=120)
    s = start_server(str(tmp_path), snap, "--workers", "2", "--strategy", strategy,
                     source=f"dir://{store}/snap1", env=env)
    try:
        clones = [_holding(s, snap, "--share-pages", "--write", "--seed", str(i))
                  for i in range(2)]
        try:
            for p in clones:
                r = _report(p)
                assert r["ok"] and r["anon_bytes"] == _as_int(r["written"]) * 4096, r
        finally:
            _release(*clones)
    finally:
        s.stop()
