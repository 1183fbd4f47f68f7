"""The Prometheus endpoint of a real ``pagein serve`` serving Firecracker-faithful VMMs,
scraped over HTTP and parsed with ``prometheus_client.parser``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import pagein

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    ServerProc,
    client,
    finish,
    make_snapshot,
    serving_workers,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
PAGES = SIZE // 4096


def _port(server: ServerProc) -> int:
    m = re.search(r"metrics on http://[^ ]+:(\d+)/metrics", server.log())
    assert m, server.log()[-2000:]
    return int(m.group(1))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _scrape(server: ServerProc, host: str = "127.0.0.1") -> dict[str, list[Sample]]:
    """Every sample of the endpoint by sample name (``pagein_faults_total``, ...),
    checking the family types on the way."""
    status, text = _get(f"http://{host}:{_port(server)}/metrics")
    assert status == 200, text
    out: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("pagein_"), family.name
        for s in family.samples:
            if family.type == "counter":
                assert s.name.endswith("_total"), s.name  # the guide: counters end in _total
            out[s.name].append(s)
    return out


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    got = [s.value for s in samples[name] if labels.items() <= s.labels.items()]
    assert len(got) == 1, (name, labels, samples.get(name))
    return got[0]


def _vm_series(samples: dict[str, list[Sample]]) -> set[str]:
    return {s.labels["session"] for name, ss in samples.items() if name.startswith("pagein_vm_")
            for s in ss}


def test_names_follow_the_guide_and_the_totals_are_the_sum_of_the_vms(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap, "--metrics-port", "0", "--strategy",
                          "readahead", "--on-bad-handshake", "close")
    held = client(*touch_args(server, snap, [(0, SIZE)], "--hold"), stdin=subprocess.PIPE)
    try:
        assert held.stdout is not None and '"ok": true' in held.stdout.readline()
        gone = client(*touch_args(server, snap, [(0, SIZE // 2)], "--threads", "1"))
        rc, res = finish(gone)
        assert rc == 0, res
        bad = client("raw", "--socket", server.socket_path, "--payload", '"hello"')
        assert finish(bad, timeout=20)[0] == 3
        wait_for(lambda: _value(_scrape(server), "pagein_sessions_ended_total",
                                end="peer exited") == 1, 10, "the second VM to end")
        m = _scrape(server)
    finally:
        held.kill()
        held.wait()
        server.stop()
    names = set(m)
    # Units last, causes as labels: none of the old names is left.
    assert not names & {"pagein_bytes_fault_total", "pagein_bytes_readahead_total",
                        "pagein_active_vms", "pagein_pages_total"}
    for name in names:
        if "bytes" in name:
            assert name.endswith(("_bytes_total", "_bytes")), name
        if "latency" in name or "seconds" in name:
            assert re.search(r"_seconds(_total|_bucket|_sum|_count)?$", name), name
    # One series per VM session, told apart by session and labelled with the VMM's pid.
    pids = {s.labels["session"]: s.labels["pid"] for s in m["pagein_vm_faults_total"]}
    assert sorted(pids.values()) == sorted([str(held.pid), str(gone.pid)])
    assert len(pids) == 2
    assert _value(m, "pagein_vm_active", pid=str(held.pid)) == 1
    assert _value(m, "pagein_vm_active", pid=str(gone.pid)) == 0
    assert _value(m, "pagein_vm_installed_pages_total", pid=str(held.pid)) == PAGES
    # Every pagein_vm_X series has a pagein_X total equal to the sum over the VMs.
    checked = 0
    for name, samples in m.items():
        if not name.startswith("pagein_vm_") or name in ("pagein_vm_active",
                                                          "pagein_vm_worker_restarts_total"):
            continue
        sums: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
        for s in samples:
            rest = tuple(sorted((k, v) for k, v in s.labels.items()
                                if k not in ("session", "pid")))
            sums[rest] += s.value
        total = name.replace("pagein_vm_", "pagein_", 1)
        for rest, value in sums.items():
            assert _value(m, total, **dict(rest)) == pytest.approx(value), (total, rest)
            checked += 1
    # 6 scalars, 3 causes, 3 events, 2 collapse results, 14 buckets + count + sum,
    # seconds without a worker
    assert checked == 31, checked
    assert _value(m, "pagein_filled_bytes_total", cause="readahead") > 0
    assert _value(m, "pagein_fault_latency_seconds_count") == _value(m, "pagein_faults_total")
    assert _value(m, "pagein_sessions_active") == 1
    assert _value(m, "pagein_handshake_failures_total") == 1
    assert _value(m, "pagein_uffd_events_total", event="unmap") == 0
    info = m["pagein_build_info"]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["version"] == pagein.__version__
    assert info[0].labels["engine"] in ("native", "python")


def test_an_ended_vms_series_go_after_metrics_keep_ended(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap, "--metrics-port", "0",
                          "--metrics-keep-ended", "1")
    try:
        c = client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1"))
        rc, res = finish(c)
        assert rc == 0, res
        wait_for(lambda: _value(_scrape(server), "pagein_sessions_ended_total",
                                end="peer exited") == 1, 10, "the VM to end")
        first = _scrape(server)
        assert _vm_series(first) in ({"1"}, set())  # listed until a second has passed
        wait_for(lambda: not _vm_series(_scrape(server)), 10, "the ended VM's series to go")
        after = _scrape(server)
    finally:
        server.stop()
    # The totals still count it: a counter never goes down when a VM's series go.
    assert _value(after, "pagein_installed_pages_total") == PAGES
    assert _value(after, "pagein_faults_total") == _value(first, "pagein_faults_total") > 0
    assert server.stats()["vms"][0]["session"] == 1  # type: ignore[index]


def test_only_metrics_is_served_and_the_address_is_honoured(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    servers = [start_server(str(tmp_path / "a"), snap, "--metrics-port", "0")]
    try:
        servers.append(start_server(str(tmp_path / "b"), snap, "--metrics-port", "0",
                                    "--metrics-address", "127.0.0.2"))
        default, other = servers
        port = _port(default)
        for path in ("/", "/metrics/", "/favicon.ico", "/stats"):
            status, body = _get(f"http://127.0.0.1:{port}{path}")
            assert status == 404, (path, status)
            assert "/metrics only" in body
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        # The default is loopback 127.0.0.1 only; --metrics-address binds what it names.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
        assert _scrape(other, "127.0.0.2")["pagein_sessions_active"][0].value == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", _port(other)), timeout=5).close()
    finally:
        for server in servers:
            server.stop()


def test_a_metrics_address_that_cannot_be_bound_is_one_clear_error(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    proc = subprocess.run([sys.executable, "-m", "pagein", "serve", "--socket",
                           str(tmp_path / "s.sock"), "--mem-file", snap, "--metrics-port",
                           "0", "--metrics-address", "192.0.2.1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot serve metrics on --metrics-address 192.0.2.1 --metrics-port 0" in \
        proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_store_cache_and_fetch_metrics_survive_a_worker_death(tmp_path: Path) -> None:
    """A store source: misses are fetches, a second VM hits the worker's memory cache, and
    the totals keep a dead worker's counts (its successor reads the host's disk cache)."""
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    env = {**os.environ, "PAGEIN_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "pagein", "store", "push", "-q", "--store",
                    f"dir://{tmp_path / 'store'}", "--chunk-size", "64K", snap, "snap1"],
                   check=True, env=env, timeout=120)
    chunks = SIZE // (64 << 10)
    server = start_server(str(tmp_path), snap, "--metrics-port", "0", "--workers", "1",
                          source=f"dir://{tmp_path / 'store'}/snap1", env=env)

    def touch_all() -> None:
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1")))
        assert rc == 0, res

    def get(name: str, **labels: str) -> float:
        m = _scrape(server)  # -1: not there yet (no worker has reported)
        return _value(m, name, **labels) if m.get(name) else -1

    try:
        touch_all()
        wait_for(lambda: get("pagein_store_cache_misses_total") == chunks, 10,
                 "the worker's fetch counts")
        m = _scrape(server)
        assert _value(m, "pagein_store_fetch_latency_seconds_count") == chunks
        assert _value(m, "pagein_store_fetched_bytes_total") > 0
        assert _value(m, "pagein_store_cache_memory_bytes") == SIZE
        touch_all()
        wait_for(lambda: get("pagein_store_cache_hits_total", tier="memory") >= chunks, 10,
                 "memory-cache hits of the second VM")
        assert get("pagein_store_cache_misses_total") == chunks  # nothing fetched again
        (worker,) = serving_workers(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: serving_workers(server.proc.pid) - {worker}, 20, "a new worker")
        touch_all()
        wait_for(lambda: get("pagein_store_cache_hits_total", tier="disk") == chunks, 10,
                 "the new worker's disk-cache hits")
        m = _scrape(server)
    finally:
        server.stop()
    # The dead worker's counts are still in the totals; its memory cache is not.
    assert _value(m, "pagein_store_cache_misses_total") == chunks
    assert _value(m, "pagein_store_cache_hits_total", tier="memory") >= chunks
    assert _value(m, "pagein_store_cache_memory_bytes") == SIZE  # the new worker's only


def test_a_file_source_has_no_store_metrics(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap, "--metrics-port", "0", "--workers", "1")
    try:
        assert not [n for n in _scrape(server) if n.startswith("pagein_store_")]
    finally:
        server.stop()


def test_a_silent_or_garbage_scraper_holds_up_no_one(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap, "--metrics-port", "0")
    port = _port(server)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as junk:
            junk.sendall(b"\x00\xff garbage \r\n\r\n")
            answer = junk.makefile("rb").read()  # until the server closes it
            assert b"Error code: 400" in answer, answer[:300]
        assert _value(_scrape(server), "pagein_sessions_active") == 0  # served meanwhile
        assert server.proc.poll() is None
    finally:
        for s in silent:
            s.close()
        server.stop()
