"""`pagein vm restore --uffd-socket` hands the guest's uffd only to a handler it trusts:
root, its own uid, or a `--trust-uid` (issue 13, finding 2), as run by a user."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagein.vmm.reference import FunctionReference

NOBODY = 65534
PEER = str(Path(__file__).resolve().parents[1] / "kernel" / "_nobody.py")
STATE, SEED = "8M", 11
REF = FunctionReference(8 << 20, SEED, 2)
REQUESTS = [f"get {REF.key(7)}", "checksum"]
ANSWERS = [REF.answer(r) for r in REQUESTS]
TIMEOUT = 120


def _pagein(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagein", "vm", *args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("trust") / "snap"
    res = _pagein("run", "--mem", "32M", "--vcpus", "1", "--snapshot-at-ready", str(d),
                  f"state={STATE}", f"seed={SEED}", stdin="checksum\n")
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by nobody (pytest's own tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="pagein-trust-", dir="/tmp"))
    try:
        d.chmod(0o755)
        os.chown(d, NOBODY, NOBODY)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_restore_refuses_a_handler_run_by_nobody(snapshot_dir: Path, nobody_dir: Path) -> None:
    sock = nobody_dir / "pagein.sock"
    listener = subprocess.Popen([sys.executable, PEER, "listen", "--socket", str(sock)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert json.loads(listener.stdout.readline()) == {"listening": True}
        res = _pagein("restore", str(snapshot_dir), "--uffd-socket", str(sock))
        out, _ = listener.communicate(timeout=TIMEOUT)
    finally:
        if listener.poll() is None:
            listener.kill()
        listener.wait()
    assert res.returncode == 1
    assert res.stderr.startswith(f"pagein: error: the UFFD handler on {sock} (pid ")
    assert f"runs as uid {NOBODY}," in res.stderr and f"--trust-uid {NOBODY}" in res.stderr
    assert json.loads(out.splitlines()[-1]) == {"accepted": True, "bytes": 0, "fds": 0}


def test_restore_with_trust_uid_is_served_by_nobody(snapshot_dir: Path,
                                                   nobody_dir: Path) -> None:
    """A real `pagein serve` running as nobody serves the restored guest once trusted."""
    mem = nobody_dir / "memory"
    shutil.copyfile(snapshot_dir / "memory", mem)
    mem.chmod(0o644)
    sock = nobody_dir / "pagein.sock"
    r, w = os.pipe()
    serve = subprocess.Popen(
        [sys.executable, PEER, "serve", "--socket", str(sock), "--mem-file", str(mem),
         "--workers", "0", "--exit-after", "1", "--ready-fd", str(w)],
        pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert select.select([r], [], [], TIMEOUT)[0] and os.read(r, 16)
        assert os.stat(sock).st_uid == NOBODY  # the handler really runs as nobody
        res = _pagein("restore", str(snapshot_dir), "--uffd-socket", str(sock),
                      "--trust-uid", "nobody", stdin="\n".join(REQUESTS) + "\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ANSWERS
        assert serve.wait(TIMEOUT) == 0
    finally:
        os.close(r)
        if serve.poll() is None:
            serve.kill()
        serve.wait()
        assert serve.stderr is not None
        serve.stderr.close()
