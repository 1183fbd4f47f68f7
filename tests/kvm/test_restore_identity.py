"""A running `pagein serve` refuses to serve another snapshot than its own (issue 17):
pagein's VMM sends the snapshot's size and SHA-256 with the handshake, and a handler
serving snapshot A tells a VMM restoring snapshot B (same size, other bytes) so, before a
single page of A reaches B's guest. Real guests on /dev/kvm, the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _guest import pagein_vm, snapshot_at_ready

from pagein.vmm.reference import FunctionReference

STATE = "8M"
SEEDS = {"a": 11, "b": 12}
TIMEOUT = 120



def _requests(seed: int) -> tuple[str, list[str]]:
    ref = FunctionReference(8 << 20, seed, 2)
    requests = [f"get {ref.key(7)}", "checksum"]
    return "\n".join(requests) + "\n", [ref.answer(r) for r in requests]


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two snapshots of the same size whose memory differs (another seed)."""
    root = tmp_path_factory.mktemp("identity")
    out = {}
    for name, seed in SEEDS.items():
        d = root / name
        snapshot_at_ready(d, state=STATE, seed=seed)
        out[name] = d
    a, b = (out[n] / "memory" for n in ("a", "b"))
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    return out


@contextmanager
def _serve(mem: Path, sock: Path, stats: Path) -> Iterator[subprocess.Popen[str]]:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagein", "-v", "serve", "--socket", str(sock), "--mem-file",
         str(mem), "--workers", "1", "--stats-json", str(stats), "--ready-fd", str(w)],
        pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(w)
    try:
        assert select.select([r], [], [], TIMEOUT)[0] and os.read(r, 16)
        yield proc
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)


def _refused(snaps: dict[str, Path], served: Path, tmp_path: Path) -> tuple[str, str, dict]:
    """Restore snapshot b through a server of ``served``; return (restore stderr, server
    log, server stats)."""
    sock, stats = tmp_path / "pagein.sock", tmp_path / "stats.json"
    with _serve(served, sock, stats) as proc:
        stdin, _ = _requests(SEEDS["b"])
        res = pagein_vm("restore", str(snaps["b"]), "--uffd-socket", str(sock), stdin=stdin)
        assert proc.poll() is None  # the server goes on serving others
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""  # the guest never ran
    return res.stderr, log, json.loads(stats.read_text())


def test_wrong_snapshot_same_size_is_refused_naming_both(snaps: dict[str, Path],
                                                         tmp_path: Path) -> None:
    err, log, stats = _refused(snaps, snaps["a"] / "memory", tmp_path)
    a, b = snaps["a"] / "memory", snaps["b"] / "memory"
    assert err.startswith("pagein: error: the UFFD handler on "), err
    assert "refused this VM: this handler serves " in err
    assert str(a) in err and str(b) in err and err.count("sha256") == 2
    assert err.count("\n") == 1  # one clear error
    assert f"refused: this handler serves {a}" in log and "no page was served" in log
    assert stats["handshake_failures"] == 1
    assert stats["total"]["pages"] == 0 and stats["vms"] == []


def test_a_served_copy_without_state_file_is_hashed_and_refuses(snaps: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """No state file beside the served file: the server hashes it once, when asked."""
    mem = tmp_path / "plain.mem"
    shutil.copyfile(snaps["a"] / "memory", mem)
    err, log, stats = _refused(snaps, mem, tmp_path)
    assert f"this handler serves {mem}" in err and str(snaps["b"] / "memory") in err
    assert f"hashing {mem}" in log
    assert stats["total"]["pages"] == 0


def test_the_right_snapshot_is_served(snaps: dict[str, Path], tmp_path: Path) -> None:
    """The same snapshot is served, from its own file and from a copy elsewhere."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(snaps["a"] / "memory", copy / "memory")
    for served in (snaps["a"] / "memory", copy / "memory"):
        sock, stats = tmp_path / "pagein.sock", tmp_path / "stats.json"
        stdin, answers = _requests(SEEDS["a"])
        with _serve(served, sock, stats):
            res = pagein_vm("restore", str(snaps["a"]), "--uffd-socket", str(sock), stdin=stdin)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == answers
        assert json.loads(stats.read_text())["total"]["pages"] > 0
