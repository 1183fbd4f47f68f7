"""Counters on SIGUSR1 and on exit, the Prometheus endpoint, logs naming the VM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_sigusr1_stats_and_prometheus_while_a_vm_runs(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    port = _free_port()
    server = start_server(str(tmp_path), snap, "--metrics-port", str(port))
    held = client(*touch_args(server, snap, [(0, SIZE)], "--hold"), stdin=subprocess.PIPE)
    try:
        assert held.stdout is not None
        assert '"ok": true' in held.stdout.readline()
        doc = server.fresh_stats()
        assert doc["active_vms"] == 1
        vm = doc["vms"][0]
        assert vm["peer_pid"] == held.pid and vm["state"] == "active"
        assert vm["pages"] == SIZE // 4096 and vm["faults"] >= 1
        assert sum(vm["latency_us_buckets"]) == vm["faults"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        labels = f'{{pid="{held.pid}",session="{vm["session"]}"}}'
        assert "\npagein_sessions_active 1.0\n" in text
        assert f"\npagein_vm_installed_pages_total{labels} {SIZE // 4096}.0\n" in text
        assert f'\npagein_vm_fault_latency_seconds_count{labels} {vm["faults"]}.0\n' in text
        assert (f'\npagein_vm_fault_latency_seconds_bucket{{le="+Inf",pid="{held.pid}",'
                f'session="{vm["session"]}"}}') in text
        assert f"vm pid={held.pid}: serving 1 regions" in server.log()
    finally:
        if held.poll() is None:
            held.kill()
        held.wait()
        server.stop()
    final = server.stats()
    assert final["active_vms"] == 0
    assert final["total"]["pages"] == SIZE // 4096  # type: ignore[index]


def test_stats_json_written_on_exit_without_vms(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    server = start_server(str(tmp_path), snap)
    rc, res = finish(client(*touch_args(server, snap, [(SIZE // 2, SIZE // 2)], "--threads", "1")))
    assert rc == 0, res
    assert server.stop() == 0
    doc = server.stats()
    assert doc["source"] == snap and doc["handshake_failures"] == 0
    assert not os.path.exists(server.socket_path)  # the socket is removed on exit
