"""The benchmark's C client and C reference handler are faithful and exact.

``benchmarks/c/fc_client.c`` plays a Firecracker VMM restoring from a UFFD handler and
verifies every byte it touched; ``benchmarks/c/fc_handler.c`` is the C baseline
``benchmarks/serve_scaling.py`` compares ``pagein serve`` with. Both must restore real
memory correctly, and the client's verification must be able to fail. No timings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import PAGE, make_snapshot, start_server

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")]

C_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "c"
SIZE = 4 << 20
# Two regions at non-trivial offsets, a gap between them in the file.
REGIONS = [(0x10000, 1 << 20), (0x180000, 2 << 20)]
LAYOUT = ",".join(f"{off}:{size}" for off, size in REGIONS)
REGION_PAGES = sum(size for _, size in REGIONS) // PAGE


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fcbin")
    built = {}
    for name in ("fc_client", "fc_handler"):
        subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-Werror", "-o", str(out / name),
                        str(C_DIR / f"{name}.c")], check=True)
        built[name] = out / name
    return built


@pytest.fixture
def mem_file(tmp_path: Path) -> str:
    path = tmp_path / "mem.raw"
    make_snapshot(str(path), SIZE)  # random pages, every 8th a hole (zeros)
    return str(path)


@pytest.fixture
def c_handler(bins: dict[str, Path], mem_file: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[str]:
    sock = str(tmp_path / "c.sock")
    populate = ["--populate"] if getattr(request, "param", False) else []
    proc = subprocess.Popen([str(bins["fc_handler"]), *populate, sock, mem_file],
                            stderr=subprocess.PIPE, text=True)
    try:
        yield sock  # the client retries connect until the handler listens
        assert proc.poll() is None, f"fc_handler died: {proc.stderr.read() if proc.stderr else ''}"
    finally:
        proc.kill()
        proc.wait()


def run_client(bins: dict[str, Path], sock: str, mem: str,
               *extra: str) -> tuple[int, dict[str, Any]]:
    p = subprocess.run([str(bins["fc_client"]), "--socket", sock, "--mem-file", mem,
                        "--regions", LAYOUT, "--timeout", "60", *extra],
                       capture_output=True, text=True, timeout=90)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from fc_client: {p.stdout} {p.stderr}"
    return p.returncode, json.loads(lines[-1])


@pytest.mark.parametrize("extra", [
    ("--fraction", "1", "--threads", "1", "--order", "seq"),
    ("--fraction", "1", "--threads", "4", "--order", "random", "--seed", "3"),
    ("--fraction", "1", "--threads", "2", "--write"),
])
def test_client_restores_from_pagein_serve(bins: dict[str, Path], mem_file: str,
                                           tmp_path: Path, extra: tuple[str, ...]) -> None:
    server = start_server(str(tmp_path), mem_file, "--strategy", "on-demand")
    try:
        rc, doc = run_client(bins, server.socket_path, mem_file, *extra)
    finally:
        server.stop()
    assert doc["errors"] == []
    assert (rc, doc["ok"], doc["pages"]) == (0, True, REGION_PAGES)  # every byte compared


def test_client_sees_pagein_populate_all_fill_everything(bins: dict[str, Path],
                                                         mem_file: str, tmp_path: Path) -> None:
    server = start_server(str(tmp_path), mem_file, "--strategy", "populate-all")
    try:
        rc, doc = run_client(bins, server.socket_path, mem_file, "--populated")
    finally:
        server.stop()
    assert (rc, doc["ok"], doc["pages"], doc["errors"]) == (0, True, REGION_PAGES, [])


@pytest.mark.parametrize("extra", [
    ("--fraction", "1", "--threads", "1"),
    ("--fraction", "1", "--threads", "4", "--order", "random", "--write"),
    ("--fraction", "0.25", "--threads", "2", "--order", "random"),
])
def test_client_restores_from_the_c_handler(bins: dict[str, Path], mem_file: str,
                                            c_handler: str, extra: tuple[str, ...]) -> None:
    rc, doc = run_client(bins, c_handler, mem_file, *extra)
    assert doc["errors"] == []
    assert (rc, doc["ok"]) == (0, True)
    want = REGION_PAGES if extra[1] == "1" else round(0.25 * REGION_PAGES)
    assert doc["pages"] == want


@pytest.mark.parametrize("c_handler", [True], indirect=True)
def test_c_handler_populates_everything(bins: dict[str, Path], mem_file: str,
                                        c_handler: str) -> None:
    rc, doc = run_client(bins, c_handler, mem_file, "--populated")
    assert (rc, doc["ok"], doc["pages"], doc["errors"]) == (0, True, REGION_PAGES, [])


def test_a_wrong_memory_file_fails_verification(bins: dict[str, Path], mem_file: str,
                                                tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    make_snapshot(str(other), SIZE, seed=99)  # same size and holes, different bytes
    server = start_server(str(tmp_path), mem_file, "--strategy", "on-demand")
    try:
        rc, doc = run_client(bins, server.socket_path, str(other), "--fraction", "1")
    finally:
        server.stop()
    assert (rc, doc["ok"]) == (1, False)
    errors = doc["errors"]
    assert isinstance(errors, list) and errors
    assert "instead of the snapshot" in errors[0]


def test_a_wrong_memory_file_fails_against_the_c_handler(bins: dict[str, Path],
                                                         mem_file: str, c_handler: str,
                                                         tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    make_snapshot(str(other), SIZE, hole_every=0, seed=99)  # no holes: every page differs
    rc, doc = run_client(bins, c_handler, str(other), "--fraction", "1")
    assert (rc, doc["ok"]) == (1, False)
    assert len(doc["errors"]) == 21  # 20 listed, then "... and N more"
    assert doc["errors"][-1] == f"... and {REGION_PAGES - 20} more"
