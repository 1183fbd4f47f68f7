"""A serving worker dies at each interesting point (pagein.serve.crash) and its VM goes
on with every byte right: during a fill (installed, not yet marked), between reading a
REMOVE and applying it, in the middle of a prefetch chunk, and holding a VM it has not
served yet. Real worker processes, a Firecracker-faithful client checking every page;
run on both fault engines (scripts/test.sh runs the serving tests again on Python)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_harness import ServerProc, client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 16 << 20
PAGES = SIZE // 4096


def _serve_with_crash(tmp_path: Path, point: str, n: int, *extra: str) -> tuple[ServerProc,
                                                                                 str, Path]:
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, SIZE)
    token = tmp_path / "crash.token"
    token.write_text("")
    env = {**os.environ, "PAGEIN_CRASH_AT": f"{point}:{n}:{token}"}
    server = start_server(str(tmp_path), mem, "--workers", "1", "--exit-after", "1",
                          "--max-restarts", "3", *extra, env=env)
    return server, mem, token


def _restore(server: ServerProc, mem: str, *args: str) -> dict[str, object]:
    rc, res = finish(client(*touch_args(server, mem, [(0, SIZE)], *args)), timeout=180)
    assert rc == 0 and res["ok"], res  # every byte = the snapshot (zeros where ballooned)
    server.proc.wait(60)
    return server.stats()


def _crashed_once(server: ServerProc, token: Path, point: str, stats: dict[str, object]) -> None:
    assert not token.exists()  # one worker claimed the crash ...
    assert f"crash point {point} reached" in server.log()  # ... and died exactly there
    assert stats["worker_restarts"] == 1, stats
    vm = stats["vms"][0]  # type: ignore[index]
    assert vm["worker_restarts"] == 1 and vm["state"] == "peer exited", vm


def test_killed_during_a_fill(tmp_path: Path) -> None:
    # Killed after its 300th fill ioctl returned and before it marked those pages: the
    # successor finds them unmarked, fills again (EEXIST, a wake), never half a page.
    server, mem, token = _serve_with_crash(tmp_path, "fill", 300)
    try:
        stats = _restore(server, mem, "--threads", "2", "--write")
        _crashed_once(server, token, "fill", stats)
    finally:
        server.stop()


def test_killed_between_reading_a_remove_and_applying_it(tmp_path: Path) -> None:
    # The balloon's first REMOVE was read (the kernel zapped the range) and the worker
    # died before applying it: only the journal knows. Stale snapshot bytes there would
    # fail the client's zero check; its successor must apply the REMOVE from the journal.
    server, mem, token = _serve_with_crash(tmp_path, "event", 1)
    try:
        stats = _restore(server, mem, "--balloon-rounds", "3", "--write")
        _crashed_once(server, token, "event", stats)
        assert stats["total"]["removes"] >= 3  # type: ignore[index]
    finally:
        server.stop()


def test_killed_in_the_middle_of_a_prefetch_chunk(tmp_path: Path) -> None:
    # populate-all, killed after the 3rd span of a chunk was installed with DONTWAKE and
    # before its wake: the successor wakes every range and resumes the plan where it was,
    # skipping filled pages (the pages installed stay within one chunk of the file size).
    server, mem, token = _serve_with_crash(tmp_path, "prefetch", 3, "--strategy",
                                           "populate-all", "--chunk-size", "64K")
    try:
        stats = _restore(server, mem, "--threads", "2")
        _crashed_once(server, token, "prefetch", stats)
        total = stats["total"]
        installed = total["pages"]  # type: ignore[index]
        assert PAGES <= installed <= PAGES + 16 * 3, total  # not started over
    finally:
        server.stop()


def test_killed_holding_a_vm_it_has_not_served(tmp_path: Path) -> None:
    # The worker got the VM (uffd, socket, state) and died before serving a fault: the
    # supervisor still holds all three and hands them to the next worker.
    server, mem, token = _serve_with_crash(tmp_path, "serve", 1)
    try:
        stats = _restore(server, mem, "--threads", "2")
        _crashed_once(server, token, "serve", stats)
    finally:
        server.stop()


def test_killed_between_reading_a_remap_and_applying_it(tmp_path: Path) -> None:
    # Case 6: the guest mremaps half-touched memory elsewhere, then munmaps a quarter of
    # it. The worker dies right after reading the REMAP: its successor must move the
    # extent from the journal, or faults at the new address would find no page to serve.
    server, mem, token = _serve_with_crash(tmp_path, "event", 1)
    try:
        rc, res = finish(client(*touch_args(server, mem, [(0, 1 << 20), (2 << 20, 2 << 20)],
                                            "--remap")), timeout=180)
        assert rc == 0 and res["ok"], res
        server.proc.wait(60)
        stats = server.stats()
        _crashed_once(server, token, "event", stats)
        vm = stats["vms"][0]  # type: ignore[index]
        assert vm["remaps"] == 1 and vm["unmaps"] >= 1, vm
    finally:
        server.stop()
