"""Data integrity under a hostile environment: an empty hugetlb pool (the kernel says
EEXIST for a page it never installed) and a memory file changed while it is served.
Every test runs on both fault engines (PAGEIN_ENGINE=python runs it again)."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    ServerProc,
    blocked_in_userfault,
    client,
    make_snapshot,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

HUGE = 2 << 20
_POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def _read(name: str) -> int:
    with open(f"{_POOL}/{name}") as f:
        return int(f.read())


def _write(name: str, value: int) -> None:
    with open(f"{_POOL}/{name}", "w") as f:
        f.write(str(value))


@contextlib.contextmanager
def _empty_hugetlb_pool() -> Iterator[None]:
    """Leave no free 2 MiB page and no overcommit for the block; restore both after.

    The pool keeps the pages others use (nr_hugepages = total - free), so a test that
    holds pages elsewhere keeps them."""
    total, over = _read("nr_hugepages"), _read("nr_overcommit_hugepages")
    try:
        _write("nr_overcommit_hugepages", 0)
        _write("nr_hugepages", total - _read("free_hugepages"))
        assert _read("free_hugepages") == 0
        yield
    finally:
        _write("nr_hugepages", total)
        _write("nr_overcommit_hugepages", over)


@pytest.fixture
def servers() -> Iterator[list[ServerProc]]:
    started: list[ServerProc] = []
    yield started
    for s in started:
        s.stop()


def _vm_row(server: ServerProc) -> dict[str, object]:
    vms = server.stats()["vms"]
    assert isinstance(vms, list) and len(vms) == 1, vms
    row: dict[str, object] = vms[0]
    return row


@pytest.mark.hugetlb
@pytest.mark.parametrize("workers", ["1", "0"])
def test_empty_hugetlb_pool_fails_the_vm_loudly_instead_of_spinning(
        tmp_path: Path, servers: list[ServerProc], workers: str) -> None:
    path = str(tmp_path / "mem.snap")
    make_snapshot(path, 4 * HUGE, hole_every=0)
    server = start_server(str(tmp_path), path, "--workers", workers)
    servers.append(server)
    with _empty_hugetlb_pool():
        c = client(*touch_args(server, path, [(0, 4 * HUGE)], "--hugetlb", "--threads", "2"))
        try:
            wait_for(lambda: "has no page there" in server.log(), 20, "the pool error in the log")
            # Served no more: the vCPUs sleep on their faults, nobody wakes them to spin.
            wait_for(lambda: blocked_in_userfault(c.pid), 10, "the client to block")
        finally:
            c.send_signal(signal.SIGKILL)
            c.wait()
    server.stop()
    log = server.log()
    errors = [ln for ln in log.splitlines() if "nr_hugepages" in ln and "ERROR" in ln]
    assert len(errors) == 1, log
    assert "2048 KiB" in errors[0] and "hugepages-2048kB/nr_hugepages" in errors[0]
    assert "has no page there" in errors[0]
    # The handshake already warned that the pool could not hold the VM.
    assert "need 4 pages but the pool can give 0" in log
    row = _vm_row(server)
    assert row["state"] == "failed"
    assert row["pages"] == 0
    assert isinstance(row["faults"], int) and row["faults"] <= 4  # no livelock
    assert isinstance(row["eexist"], int) and row["eexist"] <= 4
