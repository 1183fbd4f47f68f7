"""A plain ``pip install`` (no extras) into a fresh venv runs every command's ``--help``,
the lab, and says in one line which extra a command needs that it lacks."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``pagein`` script of a fresh venv with ``pip install ROOT`` (no extras)."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT)
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(ROOT)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    yield venv / "bin" / "pagein"


def _run(pagein: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(pagein), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def _commands(pagein: Path, *prefix: str) -> list[tuple[str, ...]]:
    """Every subcommand under ``prefix``: the entries its --help lists under "positional
    arguments" (argparse indents a subparser's choices by four spaces)."""
    text = _run(pagein, *prefix, "--help").stdout
    section = text.split("positional arguments:", 1)[-1].split("\noptions:", 1)[0]
    out: list[tuple[str, ...]] = []
    for name in re.findall(r"^    ([a-z][\w-]*)", section, flags=re.M):
        out.append((*prefix, name))
        out.extend(_commands(pagein, *prefix, name))
    return out


def test_every_help_runs_from_a_plain_install(plain: Path) -> None:
    top = _run(plain, "--help")
    assert top.returncode == 0 and "Traceback" not in top.stderr, top.stderr
    version = _run(plain, "--version")
    assert version.returncode == 0 and re.search(r"\d+\.\d+", version.stdout), version
    commands = _commands(plain)
    assert {("serve",), ("vm",), ("lab",), ("demo",), ("store",)} <= set(commands)
    assert ("vm", "restore") in commands and ("lab", "run") in commands
    for cmd in commands:
        res = _run(plain, *cmd, "--help")
        assert res.returncode == 0, (cmd, res.stderr[-2000:])
        assert "Traceback" not in res.stderr and "usage:" in res.stdout, (cmd, res.stderr)


def test_the_lab_runs_from_a_plain_install(plain: Path) -> None:
    listed = _run(plain, "lab")
    assert listed.returncode == 0, listed.stderr
    res = _run(plain, "lab", "run", "demand-paging", "--size", "4M")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stdout.strip()


def test_a_command_needing_an_extra_says_which_in_one_line(plain: Path,
                                                           tmp_path: Path) -> None:
    python = plain.with_name("python")
    has_mpl = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True,
                             check=False, timeout=TIMEOUT)
    assert has_mpl.returncode != 0  # a plain install has no matplotlib: the case tested
    trace = tmp_path / "trace.json"  # the format pagein serve --trace writes
    trace.write_text('{"format": "pagein-trace", "version": 1, "page_size": 4096, '
                     '"memory_size": 8192, "regions": [[0, 8192, 4096]], '
                     '"faults": [[10, 0, 1, "demand"]], "fills": [[12, 0, 1, "demand"]]}')
    res = _run(plain, "report", str(trace), "--out", str(tmp_path / "out.png"))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert "pip install 'pagein[plot]'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
