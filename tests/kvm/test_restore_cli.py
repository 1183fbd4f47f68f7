"""`pagein vm run --snapshot-at-ready`, `vm snapshot --control` and `vm restore`, as run
by a user."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import pagein_vm, ready_serve

from pagein.vmm.reference import FunctionReference
from serve_harness import serving_workers, wait_for

STATE, SEED = "8M", 9
REF = FunctionReference(8 << 20, SEED, 2)
REQUESTS = [f"get {REF.key(100)}", "sum 0 5000", "checksum"]
ANSWERS = [REF.answer(r) for r in REQUESTS]
TIMEOUT = 120



def _ask(proc: subprocess.Popen[bytes], request: str, then: str = "") -> str:
    """Send one request line (and ``then``) to a running guest; return its answer line."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((request + "\n" + (then + "\n" if then else "")).encode())
    proc.stdin.flush()
    assert select.select([proc.stdout], [], [], TIMEOUT)[0], f"no answer to {request!r}"
    return proc.stdout.readline().decode().strip()


@contextlib.contextmanager
def _running(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``pagein vm ARGS`` with its console on pipes; killed and closed at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "pagein", "vm", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "snap"
    res = pagein_vm("run", "--mem", "48M", "--vcpus", "2", "--snapshot-at-ready", str(d),
                    f"state={STATE}", f"seed={SEED}", stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS
    assert f"snapshot at READY: {d}" in res.stderr
    return d


@pytest.mark.parametrize("backend", ["copy", "file", "uffd"])
def test_restore_each_backend_answers_like_the_original(snapshot_dir: Path,
                                                        backend: str) -> None:
    res = pagein_vm("restore", str(snapshot_dir), "--backend", backend, "--stats",
                    stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS
    assert f"restored with {backend} in" in res.stderr


def test_restore_uffd_shared_memory_with_a_strategy(snapshot_dir: Path) -> None:
    res = pagein_vm("restore", str(snapshot_dir), "--backend", "uffd", "--shared-memory",
                    "--strategy", "populate-all", stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS


def test_restore_hands_the_uffd_to_a_running_pagein_serve(snapshot_dir: Path,
                                                           tmp_path: Path) -> None:
    sock = tmp_path / "pf.sock"
    with ready_serve([sys.executable, "-m", "pagein", "serve", "--socket", str(sock),
                      "--mem-file", str(snapshot_dir / "memory"), "--exit-after", "1",
                      "--strategy", "readahead"]) as serve:
        res = pagein_vm("restore", str(snapshot_dir), "--uffd-socket", str(sock),
                        stdin="\n".join(REQUESTS) + "\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ANSWERS
        assert serve.wait(TIMEOUT) == 0  # it served one VM, which then went away


def test_restore_through_pagein_serve_whose_worker_is_killed_during_the_answers(
        snapshot_dir: Path, tmp_path: Path) -> None:
    """`pagein vm restore --uffd-socket` through `pagein serve`, its serving worker
    SIGKILLed before every request and every 100 ms while the guest answers: the answers
    stay exact (the guest's vCPUs wait on the faults the dead worker had read, and fault
    again to its successor)."""
    sock, stats = tmp_path / "pf.sock", tmp_path / "stats.json"
    r, w = os.pipe()
    serve = subprocess.Popen([sys.executable, "-m", "pagein", "serve", "--socket", str(sock),
                              "--mem-file", str(snapshot_dir / "memory"), "--exit-after", "1",
                              "--workers", "1", "--max-restarts", "100000", "--stats-json",
                              str(stats), "--ready-fd", str(w)],
                             pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    killed: set[int] = set()
    done = threading.Event()

    def kill_workers() -> None:
        for pid in serving_workers(serve.pid) - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)

    def killer() -> None:
        while not done.wait(0.1):
            kill_workers()

    vm = None
    t = threading.Thread(target=killer, daemon=True)
    try:
        assert select.select([r], [], [], TIMEOUT)[0] and os.read(r, 16)
        vm = subprocess.Popen([sys.executable, "-m", "pagein", "vm", "restore",
                               str(snapshot_dir), "--uffd-socket", str(sock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        t.start()
        for _ in range(4):
            for request, answer in zip(REQUESTS, ANSWERS, strict=True):
                # A worker not killed yet exists (the last kill's successor is at work),
                # and dies before the request (by this thread or the killer's).
                wait_for(lambda: serving_workers(serve.pid) - killed, 30, "a new worker")
                kill_workers()
                assert _ask(vm, request) == answer
        assert vm.stdin is not None
        vm.stdin.close()
        assert vm.wait(TIMEOUT) == 0
        done.set()
        t.join()
        assert serve.wait(TIMEOUT) == 0
        doc = json.loads(stats.read_text())
        assert len(killed) >= 12, killed  # at least one kill before each request
        assert doc["worker_restarts"] + doc["worker_start_failures"] == len(killed), doc
        assert doc["vms"][0]["worker_restarts"] >= 3, doc["vms"][0]  # crashes while served
        assert doc["vms"][0]["state"] == "peer exited"
    finally:
        done.set()
        os.close(r)
        for p in (vm, serve):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait()
        assert serve.stderr is not None
        serve.stderr.close()


def test_restore_refuses_a_truncated_snapshot(snapshot_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vmstate").write_bytes((snapshot_dir / "vmstate").read_bytes()[:40])
    res = pagein_vm("restore", str(bad))
    assert res.returncode == 1
    assert res.stderr.startswith("pagein: error: snapshot state file") and "truncated" in res.stderr
    res = pagein_vm("restore", str(snapshot_dir), "--backend", "file", "--shared-memory")
    assert res.returncode == 2 and "MAP_PRIVATE" in res.stderr


def test_restore_to_a_socket_nobody_listens_on_says_how_to_start_one(
        snapshot_dir: Path, tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    res = pagein_vm("restore", str(snapshot_dir), "--backend", "uffd", "--uffd-socket", str(sock))
    assert res.returncode == 1
    memory = snapshot_dir / "memory"
    assert res.stderr.strip() == (
        f"pagein: error: no UFFD handler listens on {sock} (No such file or directory): "
        f"start one with `pagein serve --socket {sock} --mem-file {memory}` first")


def test_record_a_working_set_then_restore_with_it(snapshot_dir: Path, tmp_path: Path) -> None:
    ws = tmp_path / "working-set"
    stdin = "\n".join(REQUESTS) + "\n"
    res = pagein_vm("restore", str(snapshot_dir), "--record", str(ws), stdin=stdin)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS
    assert ws.stat().st_size > 0
    for strategy in ("working-set", "reap"):
        res = pagein_vm("restore", str(snapshot_dir), "--strategy", strategy, "--working-set",
                        str(ws), stdin=stdin)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ANSWERS


def test_snapshot_a_running_vm_through_its_control_socket(tmp_path: Path) -> None:
    control, out = tmp_path / "control.sock", tmp_path / "live"
    with _running("run", "--mem", "48M", "--vcpus", "2", "--control", str(control),
             f"state={STATE}", f"seed={SEED}") as proc:
        # One answered request proves the guest is up and the control socket bound.
        assert _ask(proc, REQUESTS[0]) == ANSWERS[0]
        snap = pagein_vm("snapshot", "--control", str(control), "--out", str(out))
        assert snap.returncode == 0, snap.stderr
        # Written: the memory file's data, not its holes (the guest uses a few MiB).
        written = re.match(rf"snapshot {re.escape(str(out))}: (\d+) KiB written of 48 MiB "
                           "memory", snap.stdout)
        assert written is not None and 0 < int(written[1]) < 49152 // 2, snap.stdout
        # The original goes on after the snapshot...
        assert _ask(proc, REQUESTS[2], then="quit") == ANSWERS[2]
        assert proc.wait(TIMEOUT) == 0
    # ...and so does the restored copy, from the same point.
    res = pagein_vm("restore", str(out), "--backend", "uffd", stdin=f"{REQUESTS[2]}\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [ANSWERS[2]]
    assert not os.path.exists(control)
    res = pagein_vm("snapshot", "--control", str(control), "--out", str(out))
    assert res.returncode == 1 and "no VM listens on control socket" in res.stderr


def test_a_restored_vm_is_snapshotted_again_through_its_control_socket(
        snapshot_dir: Path, tmp_path: Path) -> None:
    control, again = tmp_path / "r.sock", tmp_path / "again"
    with _running("restore", str(snapshot_dir), "--backend", "uffd", "--control",
             str(control)) as proc:
        assert proc.stdin is not None
        assert _ask(proc, REQUESTS[0]) == ANSWERS[0]
        snap = pagein_vm("snapshot", "--control", str(control), "--out", str(again))
        assert snap.returncode == 0, snap.stderr
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    res = pagein_vm("restore", str(again), "--backend", "copy",
                    stdin="\n".join(REQUESTS[1:]) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS[1:]


def test_diff_snapshots_through_the_control_socket_restore_as_a_chain(
        snapshot_dir: Path, tmp_path: Path) -> None:
    """`vm snapshot --diff --json` of a restored VM twice; every backend restores the top."""
    control = tmp_path / "d.sock"
    ref = FunctionReference(8 << 20, SEED, 2)
    answers = []
    with _running("restore", str(snapshot_dir), "--backend", "uffd", "--control",
             str(control)) as proc:
        assert proc.stdin is not None
        for i, update in enumerate(("update 100 3000 4", "update 2000 2100 8")):
            assert _ask(proc, update) == ref.answer(update)
            snap = pagein_vm("snapshot", "--control", str(control), "--out",
                             str(tmp_path / f"d{i}"), "--diff", "--json")
            assert snap.returncode == 0, snap.stderr
            doc = json.loads(snap.stdout)
            assert doc["diff"] is True and doc["pause_ms"] > 0
            assert 0 < doc["bytes_written"] < doc["memory_bytes"] // 20, doc
        answers = [ref.answer(r) for r in REQUESTS]
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    for backend in ("copy", "file", "uffd"):
        res = pagein_vm("restore", str(tmp_path / "d1"), "--backend", backend,
                        stdin="\n".join(REQUESTS) + "\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == answers, backend


def test_diff_of_a_vm_without_a_parent_says_take_a_full_one_first(tmp_path: Path) -> None:
    control = tmp_path / "n.sock"
    with _running("run", "--mem", "48M", "--control", str(control), f"state={STATE}",
             f"seed={SEED}") as proc:
        assert _ask(proc, REQUESTS[0]) == ANSWERS[0]
        res = pagein_vm("snapshot", "--control", str(control), "--out", str(tmp_path / "x"),
                        "--diff")
        assert res.returncode == 1
        assert "take a full snapshot first (without --diff)" in res.stderr
