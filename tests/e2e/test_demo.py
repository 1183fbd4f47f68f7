"""``pagein demo`` as a newcomer runs it: the VM demo (snapshot, restore every way,
answers checked, one table) and the memory-only demo (every byte verified)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagein.demo import VM_METHODS, page_content, run_demo, run_vm_demo, write_snapshot
from pagein.sys.mapping import PAGE_SIZE


def test_snapshot_content_is_distinct_and_has_zero_pages(tmp_path: object) -> None:
    pages = [page_content(i) for i in range(16)]
    assert all(len(p) == PAGE_SIZE for p in pages)
    assert pages[7] == bytes(PAGE_SIZE) and pages[15] == bytes(PAGE_SIZE)
    nonzero = [p for p in pages if any(p)]
    assert len(set(nonzero)) == len(nonzero) == 14


def test_run_demo_verifies_every_restore() -> None:
    result = run_demo(8 << 20)
    pages = (8 << 20) // PAGE_SIZE
    methods = [r.method for r in result.runs]
    assert methods == ["eager read()", "lazy, on-demand", "lazy, readahead",
                       "lazy, populate-all"]
    assert all(r.verified_bytes == 8 << 20 and r.pages == pages for r in result.runs)
    eager, on_demand, readahead, _ = result.runs
    assert eager.faults == 0
    # One page per fault: every page read faulted exactly once.
    assert on_demand.faults == pages
    # A 256 KiB window fills 64 pages per fault.
    assert readahead.faults <= pages // 64 + 1


def test_demo_cli_prints_table() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--memory-only", "--size", "8M"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "every byte verified" in out.stdout
    for method in ("eager read()", "lazy, on-demand", "lazy, readahead", "lazy, populate-all"):
        assert method in out.stdout


def test_demo_cli_rejects_bad_size() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--memory-only", "--size",
                          "lots"],
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


def test_run_vm_demo_restores_every_way_with_the_original_answers() -> None:
    r = run_vm_demo(8 << 20, 48 << 20, vcpus=2)
    assert [x.method for x in r.runs] == [m.label for m in VM_METHODS]
    assert all(x.answers_match for x in r.runs)
    for x in r.runs:
        assert 0 < x.resume_s <= x.first_answer_s <= x.all_state_s
    # Every restore holds at least the state the checksum read, at most all guest RAM.
    assert all(8 << 20 <= x.present_bytes <= 48 << 20 for x in r.runs)
    # Clones at once: private ones each hold the state, shared ones hold it once.
    private, shared = r.clones
    assert (private.method, shared.method) == ("uffd (private)", "uffd --share-pages")
    assert private.answers_match and shared.answers_match
    assert private.host_bytes >= 3 * (8 << 20) > 2 * shared.host_bytes >= 2 * (8 << 20)


def test_vm_demo_cli_prints_one_table() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--state", "8M", "--mem",
                          "48M", "--vcpus", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    header = [line for line in out.stdout.splitlines() if line.startswith("restore ")]
    assert len(header) == 1 and "resume" in header[0] and "all-state answer" in header[0]
    for m in VM_METHODS:
        row = [line for line in out.stdout.splitlines() if line.startswith(m.label)]
        assert len(row) == 1 and row[0].endswith("yes")
    assert "Clones sharing memory: 3 clones alive at once" in out.stdout
    for label in ("uffd (private)", "uffd --share-pages"):
        row = [line for line in out.stdout.splitlines() if line.startswith(label + " ")]
        assert len(row) == 1 and row[0].endswith("yes"), out.stdout
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--state", "64M", "--mem",
                          "32M"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "raise --mem" in out.stderr


def test_memory_demo_size_without_unit_is_one_clear_line() -> None:
    out = subprocess.run([sys.executable, "-m", "pagein", "demo", "--memory-only", "--size",
                          "64"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "pagein: error: demo size 64 must be a positive multiple of 4096: pass --size with a "
        "unit, e.g. --size 64M"]
    assert "writing" not in out.stdout
