"""``pagein store push|pull|ls|rm|gc`` through the real entry point, as a user runs them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pagein.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_ls_pull_rm_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content = os.urandom(200_000) + bytes(300_000) + b"tail" * 1000
    (tmp_path / "mem").write_bytes(content)
    store = f"dir://{tmp_path / 'store'}"

    code, out, err = run(capsys, "store", "push", str(tmp_path / "mem"), "vm1", "--store", store,
                         "--chunk-size", "64K")
    assert code == 0, err
    for row in ("chunks", "zero (not stored)", "unique", "bytes in", "bytes out",
                "compression ratio", "dedup savings"):
        assert row in out
    assert "uploading" in err  # progress goes to stderr

    code, out, _ = run(capsys, "store", "push", str(tmp_path / "mem"), "vm2", "--store", store,
                       "--chunk-size", "64K", "-q")
    assert code == 0 and "100.0%" in out  # every chunk was already stored

    code, out, _ = run(capsys, "store", "ls", "--store", store)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["vm1", "vm2"]

    code, out, _ = run(capsys, "store", "pull", "vm1", str(tmp_path / "out"), "--store", store)
    assert code == 0 and "every chunk verified" in out
    assert (tmp_path / "out").read_bytes() == content

    assert run(capsys, "store", "rm", "vm1", "--store", store)[0] == 0
    code, out, _ = run(capsys, "store", "gc", "--store", store, "--grace", "0")
    assert code == 0 and "deleted 0" in out  # vm2 still needs every chunk
    assert run(capsys, "store", "rm", "vm2", "--store", store)[0] == 0
    past = time.time() - 10  # file mtimes tick in jiffies: make the chunks clearly older
    for p in (tmp_path / "store" / "chunks").rglob("*.zst"):
        os.utime(p, (past, past))
    code, out, _ = run(capsys, "store", "gc", "--store", store, "--grace", "0")
    assert code == 0 and "deleted 0" not in out
    assert not list((tmp_path / "store" / "chunks").rglob("*.zst"))


def test_errors_are_one_line_naming_the_fix(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mem").write_bytes(b"x" * 70_000)
    store = str(tmp_path / "store")
    code, _, err = run(capsys, "store", "push", str(tmp_path / "mem"), "vm", "--store", store,
                       "--chunk-size", "3M")
    assert code == 1 and "power of two from 64K to 4M" in err
    code, _, err = run(capsys, "store", "push", str(tmp_path / "nope"), "vm", "--store", store)
    assert code == 1 and "cannot read memory file" in err
    code, _, err = run(capsys, "store", "pull", "ghost", str(tmp_path / "o"), "--store", store)
    assert code == 1 and "no snapshot 'ghost'" in err and "pagein store ls" in err
    code, _, err = run(capsys, "store", "push", str(tmp_path / "mem"), "bad/name",
                       "--store", store)
    assert code == 1 and "snapshot name 'bad/name' is invalid" in err
    code, _, err = run(capsys, "store", "ls", "--store", "ftp://x")
    assert code == 1 and "unknown scheme 'ftp'" in err
