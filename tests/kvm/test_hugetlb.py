"""Hugetlb (2 MiB page) guests end to end, as a user runs them: `pagein vm run
--hugepages`, `pagein vm snapshot`, `pagein vm restore` with every backend (the uffd one
through the handler it spawns and through `pagein serve --uffd-socket`, faulting whole
2 MiB pages), the working set recorded in 2 MiB pages, and the too-small pool refused at
start with the number of pages to give it.

The hugetlb pool is machine-wide and shared with other test runs: each test raises
vm.nr_hugepages only by what it lacks, compares with free pages (never the total), and
gives back what it added (serve_harness.hugepages / hugetlb_free_exactly).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _guest import ready_serve

from pagein.snapshot import workingset
from pagein.vmm.reference import FunctionReference
from serve_harness import hugepages, hugetlb_free_exactly

pytestmark = pytest.mark.hugetlb

MiB = 1 << 20
HUGE = 2 * MiB
MEM, STATE, SEED = 32 * MiB, 8 * MiB, 9
PAGES = MEM // HUGE  # 16 huge pages of guest RAM
REF = FunctionReference(STATE, SEED, 2)
REQUESTS = [f"get {REF.key(100)}", "sum 0 5000", "checksum"]
ANSWERS = [REF.answer(r) for r in REQUESTS]
TIMEOUT = 120


def _pagein(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagein", *args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _ask(proc: subprocess.Popen[bytes], request: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{request}\n".encode())
    proc.stdin.flush()
    assert select.select([proc.stdout], [], [], TIMEOUT)[0], f"no answer to {request!r}"
    return proc.stdout.readline().decode().strip()


@pytest.fixture(autouse=True)
def pool() -> Iterator[None]:
    """PAGES free 2 MiB pages plus the spare a uffd fill needs, for each test (not the
    module: another run on this machine may shrink the shared pool meanwhile)."""
    with hugepages(PAGES) as ok:
        assert ok, f"cannot raise vm.nr_hugepages to get {PAGES + 1} free 2 MiB pages"
        yield


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with hugepages(PAGES) as ok:
        assert ok, f"cannot raise vm.nr_hugepages to get {PAGES + 1} free 2 MiB pages"
        yield _snapshot(tmp_path_factory)


def _snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vm run --hugepages --control`, then `vm snapshot` of it while it runs: the
    snapshot records 2 MiB pages, and the original goes on answering after it."""
    tmp = tmp_path_factory.mktemp("huge")
    d, ctl = tmp / "snap", str(tmp / "vm.sock")
    vm = subprocess.Popen([sys.executable, "-m", "pagein", "vm", "run", "--mem", f"{MEM >> 20}M",
                           "--vcpus", "2", "--hugepages", "--control", ctl, f"state={STATE >> 20}M",
                           f"seed={SEED}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        assert _ask(vm, "checksum") == REF.answer("checksum")  # READY and served
        shot = _pagein("vm", "snapshot", "--control", ctl, "--out", str(d), "--json")
        assert shot.returncode == 0, shot.stderr
        assert [_ask(vm, r) for r in REQUESTS] == ANSWERS
    finally:
        assert vm.stdin is not None
        vm.stdin.close()
        rc = vm.wait(TIMEOUT)
        assert vm.stderr is not None
        err = vm.stderr.read().decode()
        vm.stderr.close()
        assert vm.stdout is not None
        vm.stdout.close()
    assert rc == 0, err
    doc = json.loads((d / "vmstate").read_bytes()[56:])
    assert [r["page_size"] for r in doc["memory"]["regions"]] == [HUGE]
    return d


@pytest.mark.parametrize(("backend", "strategy"), [("copy", None), ("file", None),
                                                   ("uffd", "on-demand"), ("uffd", "readahead")])
def test_hugetlb_snapshot_restores_with_every_backend(snap: Path, backend: str,
                                                     strategy: str | None) -> None:
    more = [] if strategy is None else ["--strategy", strategy]
    res = _pagein("vm", "restore", str(snap), "--backend", backend, *more, "--stats",
                  stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS
    assert f"restored with {backend} in" in res.stderr


def _restore_through_serve(snap: Path, tmp: Path, *extra: str) -> dict[str, int]:
    """`pagein vm restore --uffd-socket` through a `pagein serve --exit-after 1` started
    with ``extra``: the answers are the original's; return the served VM's counters."""
    sock, stats = str(tmp / "pf.sock"), tmp / "stats.json"
    with ready_serve([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                      "--mem-file", str(snap / "memory"), "--exit-after", "1",
                      "--stats-json", str(stats), *extra], TIMEOUT) as serve:
        res = _pagein("vm", "restore", str(snap), "--uffd-socket", sock,
                      stdin="\n".join(REQUESTS) + "\n")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ANSWERS
        assert serve.wait(TIMEOUT) == 0  # it served this one VM and exited
    vm: dict[str, int] = json.loads(stats.read_text())["vms"][0]
    return vm


def test_hugetlb_restore_through_pagein_serve_faults_2mib_pages_and_records_them(
        snap: Path, tmp_path: Path) -> None:
    """Lazily through `pagein serve --uffd-socket`: every fault installs one whole 2 MiB
    page; the working set recorded holds whole, aligned 2 MiB pages; restoring from it
    prefetches them in 2 MiB units and the answers stay exact."""
    ws = tmp_path / "working-set"
    vm = _restore_through_serve(snap, tmp_path, "--record", str(ws))
    # Every page installed was a whole 2 MiB page, on a fault (two vCPUs faulting on one
    # page count two faults and one page).
    assert vm["pages"] > 0 and vm["bytes_readahead"] == vm["bytes_background"] == 0, vm
    assert vm["bytes_fault"] + vm["zero_pages"] * HUGE == vm["pages"] * HUGE, vm
    with workingset.load(str(ws)) as recorded:
        runs = recorded.runs
    assert runs and all(r.offset % HUGE == 0 and r.length % HUGE == 0 for r in runs), \
        [(hex(r.offset), r.pages) for r in runs]
    assert sum(r.length for r in runs) == vm["pages"] * HUGE  # each faulted page, whole

    (tmp_path / "again").mkdir()
    again = _restore_through_serve(snap, tmp_path / "again", "--strategy", "working-set",
                                   "--working-set", str(ws), "--then", "on-demand")
    # Prefetched and faulted pages are whole 2 MiB pages, and together they are exactly the
    # recorded ones (the same requests touch the same pages): nothing was filled twice.
    assert again["bytes_background"] % HUGE == 0 and again["bytes_fault"] % HUGE == 0, again
    assert again["pages"] * HUGE == sum(r.length for r in runs), again


def test_working_set_restore_of_a_hugetlb_snapshot_answers_exactly(snap: Path,
                                                                   tmp_path: Path) -> None:
    """`vm restore --record` through the handler it spawns, then `--strategy working-set`
    from that recording (the path users take)."""
    ws = str(tmp_path / "working-set")
    first = _pagein("vm", "restore", str(snap), "--record", ws,
                    stdin="\n".join(REQUESTS) + "\n")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 30  # the handler writes it as the VM goes
    while not os.path.exists(ws) and time.monotonic() < deadline:
        time.sleep(0.05)
    res = _pagein("vm", "restore", str(snap), "--strategy", "working-set", "--working-set", ws,
                  stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS


@pytest.mark.parametrize(("how", "need"), [("run", PAGES), ("copy", PAGES),
                                           ("uffd", PAGES + 1)])
def test_too_small_pool_is_refused_at_start_with_the_pages_needed(
        snap: Path, tmp_path: Path, how: str, need: int) -> None:
    """One page short of what each needs (for uffd: the guest's pages and one spare, so
    exactly the guest's pages free is too few): one error before any guest runs, naming
    vm.nr_hugepages and the pages needed, not EFAULT from inside KVM_RUN or a frozen
    guest."""
    if how == "run":
        args = ["vm", "run", "--mem", f"{MEM >> 20}M", "--hugepages", f"state={STATE >> 20}M"]
    else:
        args = ["vm", "restore", str(snap), "--backend", how]
    with hugetlb_free_exactly(need - 1):
        res = _pagein(*args, stdin="checksum\n")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stdout == ""  # no guest answered
    err = res.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("pagein: error: "), err
    assert f"needs {need} free 2048 KiB pages, the pool can give {need - 1}: raise " \
           "vm.nr_hugepages to" in err, err
    assert "Bad address" not in err and "EFAULT" not in err
    if how == "uffd":
        assert f"{PAGES} pages of guest memory and 1 spare" in err, err


def test_file_restore_of_a_hugetlb_snapshot_needs_no_pool(snap: Path) -> None:
    """`--backend file` maps the memory file's page cache (4 KiB pages): it runs with
    not one free huge page."""
    with hugetlb_free_exactly(0):
        res = _pagein("vm", "restore", str(snap), "--backend", "file",
                      stdin="\n".join(REQUESTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ANSWERS
