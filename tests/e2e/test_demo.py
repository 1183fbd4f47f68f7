"""``pagein demo`` as a newcomer runs it: both restores verified, a table printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagein.demo import page_content, run_demo, write_snapshot
from pagein.sys.mapping import PAGE_SIZE


def test_snapshot_content_is_distinct_and_has_zero_pages(tmp_path: object) -> None:
    pages = [page_content(i) for i in range(16)]
    assert all(len(p) == PAGE_SIZE for p in pages)
    assert pages[7] == bytes(PAGE_SIZE) and pages[15] == bytes(PAGE_SIZE)
    nonzero = [p for p in pages if any(p)]
    assert len(set(nonzero)) == len(nonzero) == 14


def test_run_demo_verifies_both_restores() -> None:
    result = run_demo(8 << 20)
    eager, lazy = result.runs
    assert eager.verified_bytes == lazy.verified_bytes == 8 << 20
    # Every page was touched once, so the handler served at least one fault per data page.
    assert lazy.faults >= (8 << 20) // PAGE_SIZE * 7 // 8 // 16


def test_demo_cli_prints_table() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--size", "8M"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "every byte verified" in out.stdout
    assert "eager read()" in out.stdout and "lazy (pagein uffd)" in out.stdout


def test_demo_cli_rejects_bad_size() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--size", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "e.g. 256M" in out.stderr


@pytest.mark.parametrize("size", [0, 4095])
def test_run_demo_rejects_unaligned_size(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        run_demo(size)


def test_write_snapshot_roundtrip(tmp_path: object) -> None:
    import pathlib

    p = pathlib.Path(str(tmp_path)) / "m.snap"
    write_snapshot(str(p), 16 * PAGE_SIZE)
    data = p.read_bytes()
    assert [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(16)] == \
        [page_content(i) for i in range(16)]
