"""A trace written by a real ``pagein serve --trace`` names its strategy, and ``pagein
report`` puts it in the picture's title."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pagein.report import plot_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 1 << 20


@pytest.mark.parametrize(("flags", "label"), [
    (["--strategy", "readahead", "--readahead-size", "64K"], "readahead 64 KiB"),
    (["--strategy", "populate-all"], "populate-all"),
])
def test_the_trace_records_the_strategy_and_the_report_titles_it(
        tmp_path: Path, flags: list[str], label: str) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    trace = tmp_path / "t.json"
    server = start_server(str(tmp_path), snap, "--trace", str(trace), "--exit-after", "1",
                          *flags)
    rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1")))
    assert rc == 0, res
    assert server.proc.wait(30) == 0
    assert json.loads(trace.read_text())["strategy"] == label
    s = plot_trace(str(trace), str(tmp_path / "r.png"))
    assert s.title.startswith(f"restore with {label}: ")
    assert (tmp_path / "r.png").stat().st_size > 0
