"""A serving worker that dies is replaced and its VMs go on (pagein.serve.recovery):
real worker processes SIGKILLed while a Firecracker-faithful client restores, faults
with several threads and balloons; every byte is checked, zeros after the balloon."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_serve_session import ScriptedUffd  # a scripted uffd: no real VM needed

from pagein.serve.engine import EngineName
from pagein.serve.firecracker import Region
from pagein.serve.recovery import journal_events
from pagein.serve.session import Session
from pagein.serve.state import VmState
from pagein.serve.strategies import OnDemand
from pagein.snapshot.raw import RawFileSource
from pagein.sys.uffd import PageFault
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

SIZE = 16 << 20


def _workers(server: ServerProc) -> set[int]:
    return serving_workers(server.proc.pid)


def test_worker_killed_every_100ms_during_a_restore_with_writes_and_a_balloon(
        tmp_path: Path) -> None:
    """The target of the recovery issue: 256 MiB, two faulting threads in random order
    writing into every page they read, a balloon inflating and deflating over half of it,
    and the serving worker SIGKILLed every 100 ms for the whole restore."""
    size = 256 << 20
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, size)
    server = start_server(str(tmp_path), mem, "--workers", "1", "--exit-after", "1",
                          "--max-restarts", "100000")
    killed: set[int] = set()
    done = threading.Event()

    def killer() -> None:
        while not done.wait(0.1):
            for pid in _workers(server) - killed:  # not one SIGKILLed before, not reaped yet
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass

    try:
        c = client(*touch_args(server, mem, [(0, size)], "--write", "--balloon-rounds", "3"))
        # Kill from the moment the VM is being served (the client reads 256 MiB first).
        wait_for(lambda: "serving 1 regions" in server.log(), 60, "the VM to connect")
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        started = time.monotonic()
        rc, res = finish(c, timeout=600)
        took = time.monotonic() - started
        done.set()
        t.join()
        kills = len(killed)
        # Every byte = the snapshot, every write kept, zeros after the balloon.
        server.proc.wait(60)
        total = server.stats()
        vm = total["vms"][0]  # type: ignore[index]
        print(f"{kills} kills in {took:.1f} s; {vm['ms_without_worker']:.0f} ms without "
              f"a worker ({vm['ms_without_worker'] / max(1, kills):.1f} ms per kill)")
        assert rc == 0 and res["ok"], res
        assert res["written"] == size // 4096 // 2 // 4, res  # every 4th page of the half kept
        assert kills >= took / 0.3, (kills, took)  # killed all along, not once
        # Each kill was a worker that served (replaced) or one that was starting.
        restarts = total["worker_restarts"]
        assert restarts + total["worker_start_failures"] == kills, total
        # Nearly all of them served this VM: a kill can also land as the VM went, or on a
        # successor between its adoption and the VM's hand-over (a window load widens:
        # 584 of 586 once on a loaded machine).
        slack = max(1, restarts // 100)
        assert restarts - slack <= vm["worker_restarts"] <= restarts, (vm, restarts)
        assert vm["ms_without_worker"] > 0
        assert vm["state"] == "peer exited"
    finally:
        done.set()
        server.stop()


def _serving(server: ServerProc) -> dict[int, int | None]:
    """peer pid -> the pid of the worker serving it, for the active VMs."""
    return {vm["peer_pid"]: vm["worker_pid"]  # type: ignore[index]
            for vm in server.fresh_stats()["vms"]  # type: ignore[union-attr]
            if vm["state"] == "active"}  # type: ignore[index]


def _kill_and_wait(server: ServerProc, pid: int, peers: list[int]) -> None:
    """SIGKILL worker ``pid``; wait until every peer is served by a live other worker."""
    os.kill(pid, signal.SIGKILL)

    def moved() -> bool:
        now = _serving(server)
        return all(now.get(p) not in (None, pid) for p in peers)

    wait_for(moved, 30, f"the VMs of worker {pid} to be served again")


def test_a_vm_whose_workers_keep_dying_fails_alone(tmp_path: Path) -> None:
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, SIZE)
    server = start_server(str(tmp_path), mem, "--workers", "1", "--max-restarts", "3")
    procs = []
    try:
        for _ in range(2):
            c = client(*touch_args(server, mem, [(0, SIZE)], "--threads", "1", "--hold"),
                       stdin=subprocess.PIPE)
            procs.append(c)
            assert c.stdout is not None
            assert '"ok": true' in c.stdout.readline()
        victim, other = procs
        both = [victim.pid, other.pid]
        for _ in range(2):  # both VMs share the crashing worker twice ...
            (w,) = set(_serving(server).values())
            assert w is not None
            _kill_and_wait(server, w, both)
        # ... then each is served by a worker of its own: kill only the victim's.
        now = _serving(server)
        assert now[victim.pid] != now[other.pid]
        pid = now[victim.pid]
        assert pid is not None
        _kill_and_wait(server, pid, [victim.pid])
        pid = _serving(server)[victim.pid]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the fourth crash: more than --max-restarts 3
        assert victim.wait(20) == -signal.SIGKILL  # --on-vm-failure kill (the default)
        vms = {vm["peer_pid"]: vm for vm in server.fresh_stats()["vms"]}  # type: ignore[union-attr]
        assert vms[victim.pid]["state"] == "failed" and vms[victim.pid]["worker_restarts"] == 4
        assert vms[other.pid]["state"] == "active" and vms[other.pid]["worker_restarts"] == 2
        assert other.poll() is None  # still alive, still served
        assert other.stdin is not None
        other.stdin.close()  # --hold: the client exits on EOF
        assert other.wait(20) == 0
        assert "serving failed for good (4 workers died serving it)" in server.log()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()


def test_a_remove_read_by_a_dead_worker_is_applied_by_its_successor(tmp_path: Path) -> None:
    """Case 4 of pagein.serve.recovery: the journal keeps what the kernel handed over."""
    region = Region(0x7F0000000000, 64 * 4096, 0)
    with VmState.create([region]) as state:
        # What a worker leaves behind if killed right after read() returned a REMOVE of
        # pages 8..15 and a fault (the fault slot it had already cleared).
        rec = bytes([0x15]) + bytes(7) + (region.base_address + 8 * 4096).to_bytes(8, "little") \
            + (region.base_address + 16 * 4096).to_bytes(8, "little") + bytes(8)
        state.journal[32:64] = rec
        assert journal_events(state.journal) == [
            (0x15, region.base_address + 8 * 4096, region.base_address + 16 * 4096, 0)]
        state.filled[0].set(0, 64)  # everything had been filled before the balloon
        path = tmp_path / "mem.snap"
        path.write_bytes(b"\x5a" * (64 * 4096))
        stop_r, stop_w = os.pipe()
        uffd = ScriptedUffd(stop_w)
        uffd.stop_after = 2
        uffd.push([PageFault(region.base_address + 9 * 4096, False, False, False, 0)])
        with RawFileSource(path) as src:
            s = Session(uffd=uffd, sock=None, regions=[region],  # type: ignore[arg-type]
                        source=src, strategy=OnDemand(), state=state, name="vm test",
                        stop_fd=stop_r, engine=EngineName.PYTHON, resume=True)
            s.run()
            s.close()
        # The successor woke the range, then served the fault on a removed page as zeros.
        assert uffd.calls[0] == ("wake", region.base_address, 64 * 4096)
        assert ("zeropage", region.base_address + 9 * 4096, 4096) in uffd.calls
        assert state.discarded[0].count_range(8, 8) == 8
        assert not any(state.journal)  # applied, then cleared
        uffd.close()
        os.close(stop_r)
        os.close(stop_w)
