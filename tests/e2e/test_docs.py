"""The code in README.md and docs/*.md stays true: every Python block runs as written,
and every ``pagein`` command line in a shell block is accepted by pagein's own parser.

A Python block preceded by ``<!-- continues -->`` is run together with the Python block
before it (a walkthrough in steps); one preceded by ``<!-- not run: WHY -->`` is only
compiled, never run, and must say why. Python blocks run in a fresh directory holding
``snapshot.mem`` (1 MiB of random bytes) with a 120 s limit.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pagein.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*(continues|not run:.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    mark: str  # "", "continues" or "not run: ..."

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i, mark = 0, ""
    while i < len(lines):
        m = _MARK.match(lines[i])
        if m:
            mark = m.group(1)
            i += 1
            continue
        f = _FENCE.match(lines[i])
        if f and f.group(1):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(path, start, f.group(1), "\n".join(body) + "\n", mark))
        elif lines[i].strip():
            mark = ""
        i += 1
    return out


ALL = [b for p in DOCS for b in blocks(p)]


def python_programs() -> list[tuple[str, str, bool]]:
    """(where, program, run it) for every Python block, continued blocks joined."""
    out: list[tuple[str, str, bool]] = []
    for b in ALL:
        if b.lang != "python":
            continue
        if b.mark == "continues" and out:
            where, code, run = out.pop()
            out.append((f"{where}+{b.line}", code + b.code, run))
        else:
            out.append((b.where, b.code, not b.mark.startswith("not run")))
    return out


@pytest.mark.parametrize(("where", "code", "run"), python_programs(),
                         ids=[p[0] for p in python_programs()])
def test_python_block_runs(where: str, code: str, run: bool, tmp_path: Path) -> None:
    compile(code, where, "exec")  # every block at least parses
    if not run:
        return
    (tmp_path / "snapshot.mem").write_bytes(os.urandom(1 << 20))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{where} failed:\n{res.stderr[-3000:]}"


_OPS = {"|", "||", "&&", ";", "&", "(", ")"}


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _logical_lines(b: Block) -> list[tuple[int, str]]:
    """(line index, command) of a shell block: backslash continuations and quotes that
    span lines joined; in a ``console`` block only the ``$ `` lines are commands."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for k, raw in enumerate(b.code.splitlines()):
        if b.lang == "console" and not pending:
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        if not pending:
            first = k
        pending = f"{pending}\n{raw}" if pending else raw
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            _words(pending)
        except ValueError:  # a quote still open: the command goes on
            continue
        out.append((first, pending))
        pending = ""
    return out


def _pagein_lines() -> list[tuple[str, list[str]]]:
    """Every ``pagein ...`` command in a shell block: (where, argv after ``pagein``)."""
    out = []
    for b in ALL:
        if b.lang not in ("sh", "bash", "console", "shell"):
            continue
        for k, line in _logical_lines(b):
            words = _words(line)
            commands: list[list[str]] = [[]]
            for w in words:
                if w in _OPS:
                    commands.append([])
                else:
                    commands[-1].append(w)
            for words in commands:
                while words and (("=" in words[0] and not words[0].startswith("-"))
                                 or words[0] in ("sudo", "exec", "time")):
                    words = words[1:]  # VAR=value, sudo, exec before the command
                if not words or not (words[0] == "pagein" or words[0].endswith("bin/pagein")):
                    continue
                argv = []
                for w in words[1:]:
                    if w[:1] in "<>" or w[:2] in ("2>", "1>"):
                        break  # a redirection ends the arguments
                    argv.append(w)
                out.append((f"{b.path.relative_to(ROOT)}:{b.line + k}", argv))
    return out


@pytest.mark.parametrize(("where", "argv"), _pagein_lines(), ids=[w for w, _ in _pagein_lines()])
def test_pagein_command_in_the_docs_parses(where: str, argv: list[str]) -> None:
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: pagein {' '.join(argv)} is refused by the parser "
                             f"(exit {e.code})") from None
    assert getattr(args, "handler", None) is not None or "--help" in argv, where
