"""`pagein vm restore --uffd-socket` hands the guest's uffd only to a handler it trusts:
root, its own uid, or a `--trust-uid` (issue 13, finding 2), as run by a user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import pagein_vm, ready_serve, snapshot_at_ready

from pagein.vmm.reference import FunctionReference

NOBODY = 65534
PEER = str(Path(__file__).resolve().parents[1] / "kernel" / "_nobody.py")
STATE, SEED = "8M", 11
REF = FunctionReference(8 << 20, SEED, 2)
REQUESTS = [f"get {REF.key(7)}", "checksum"]
ANSWERS = [REF.answer(r) for r in REQUESTS]
TIMEOUT = 120



@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("trust") / "snap"
    snapshot_at_ready(d, state=STATE, seed=SEED)
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
        res = pagein_vm("restore", str(snapshot_dir), "--uffd-socket", str(sock))
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
    with ready_serve([sys.executable, PEER, "serve", "--socket", str(sock), "--mem-file",
                      str(mem), "--workers", "0", "--exit-after", "1"]) as serve:
        assert os.stat(sock).st_uid == NOBODY  # the handler really runs as nobody
        res = pagein_vm("restore", str(snapshot_dir), "--uffd-socket", str(sock),
                        "--trust-uid", "nobody", stdin="\n".join(REQUESTS) + "\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ANSWERS
        assert serve.wait(TIMEOUT) == 0
