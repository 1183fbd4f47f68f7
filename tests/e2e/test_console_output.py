"""What ``pagein store push`` prints: plain lines into a pipe, rich on a terminal (a pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest


def _memory_file(tmp_path: Path) -> Path:
    mem = tmp_path / "mem"
    mem.write_bytes(os.urandom(4 << 20) + bytes(1 << 20))
    return mem


def _push(tmp_path: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "pagein", "store", "push", str(_memory_file(tmp_path)), name,
            "--store", f"dir://{tmp_path / 'store'}", "--chunk-size", "64K"]


def test_push_into_a_pipe_prints_plain_lines(tmp_path: Path) -> None:
    proc = subprocess.run(_push(tmp_path, "vm1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr  # no escape sequences
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pushed vm1 to dir://")
    assert lines[1].split() == ["value"] and set(lines[2]) <= {"-", " "}
    assert any(ln.split()[:1] == ["chunks"] and "80 x 64 KiB" in ln for ln in lines)
    # Progress on stderr: whole lines, the last one with the bytes done and a rate.
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("uploading")][-1]
    assert last.startswith("uploading 80/80, 5.0 MiB of 5.0 MiB (") and "/s)" in last


def _run_in_pty(argv: list[str], columns: int) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for 120 s: {out[-2000:]!r}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


@pytest.mark.parametrize("columns", [60, 120])
def test_push_on_a_terminal_uses_rich(tmp_path: Path, columns: int) -> None:
    code, out = _run_in_pty(_push(tmp_path, "vm1"), columns)
    assert code == 0, out
    assert "\x1b[?25l" in out  # rich's live progress hides the cursor while it draws
    assert "pushed vm1 to dir://" in out
    # The table is drawn with box characters, no line wider than the terminal.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "")
    table = [ln for ln in text.split("\n") if "│" in ln or "┃" in ln]
    assert any("compression ratio" in ln for ln in table), out
    assert all(len(ln) <= columns for ln in table)


def test_lab_run_draws_its_table_with_rich_on_a_terminal_and_plain_into_a_pipe() -> None:
    argv = [sys.executable, "-m", "pagein", "lab", "run", "demand-paging", "--size", "1M"]
    code, out = _run_in_pty(argv, 200)
    assert code == 0, out
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "")
    table = [ln for ln in text.split("\n") if "│" in ln or "┃" in ln]
    assert any("read one byte of every page" in ln for ln in table), out
    assert any("minflt" in ln for ln in table) and all(len(ln) <= 200 for ln in table)
    assert "facts:" in text
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout and "│" not in piped.stdout  # plain columns
    header = next(ln for ln in piped.stdout.splitlines() if ln.strip().startswith("step"))
    assert header.startswith("  step") and "minflt" in header
