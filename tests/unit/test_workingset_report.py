"""``pagein report``: a trace picture and the strategy bars, as PNG files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagein.errors import SnapshotFormatError
from pagein.report import plot_compare, plot_trace
from pagein.serve.cause import Cause
from pagein.serve.record import Recorder

PNG = b"\x89PNG\r\n\x1a\n"


class _Src:
    size = 1 << 20


def _trace(tmp_path: Path) -> str:
    rec = Recorder(trace_path=str(tmp_path / "t.json"))
    rec.fault(0x3000, 11, False)
    rec.filled(0x3000, 1, Cause.DEMAND)
    rec.filled(0x4000, 15, Cause.READAHEAD)
    rec.filled(0x10000, 64, Cause.PREFETCH)
    rec.filled(0x80000, 2, Cause.ZERO)
    rec.finish(_Src(), [])  # type: ignore[arg-type]
    return str(tmp_path / "t.json")


def test_trace_picture_counts_pages_by_arrival(tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    s = plot_trace(_trace(tmp_path), str(out))
    assert out.read_bytes()[:8] == PNG
    assert s.faults == 1
    assert s.pages == {"demand": 1, "readahead": 15, "prefetch": 64, "zero": 2}


def test_compare_bars_and_the_cli(tmp_path: Path) -> None:
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"rows": [
        {"label": "uffd on-demand 4K", "mix": "A", "first_answer_ms": 9.0, "burst_ms": 600.0},
        {"label": "working-set", "mix": "A", "first_answer_ms": 12.0, "burst_ms": 150.0}]}))
    assert plot_compare(str(res), str(tmp_path / "b.png")).rows == 2
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG
    out = subprocess.run([sys.executable, "-m", "pagein", "report", _trace(tmp_path), "--out",
                          str(tmp_path / "c.png")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "1 faults" in out.stdout, out.stderr
    res.write_text(json.dumps({"rows": [{"label": "x"}]}))
    with pytest.raises(SnapshotFormatError, match="burst_ms"):
        plot_compare(str(res), str(tmp_path / "d.png"))


def test_the_title_names_the_strategy_the_legend_is_beside_the_axes(tmp_path: Path) -> None:
    from pagein.report import draw_trace
    from pagein.serve.record import load_trace
    rec = Recorder(trace_path=str(tmp_path / "t.json"), strategy="readahead 256 KiB")
    rec.fault(0x3000, 11, False)
    rec.filled(0x3000, 1, Cause.DEMAND)
    rec.filled(0x4000, 63, Cause.READAHEAD)
    rec.finish(_Src(), [])  # type: ignore[arg-type]
    trace = load_trace(str(tmp_path / "t.json"))
    assert trace.strategy == "readahead 256 KiB"
    fig, _ = draw_trace(trace)
    ax = fig.axes[0]
    assert ax.get_title() == "restore with readahead 256 KiB: 1 faults, 64 pages installed"
    # The first milliseconds get room: a symlog time axis, linear near zero.
    assert ax.get_xscale() == "symlog"
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    axes = ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, over no point
    assert legend.x1 <= fig.bbox.x1  # and inside the picture


def test_a_trace_without_a_strategy_still_reads(tmp_path: Path) -> None:
    """Traces written before the strategy was recorded load, and their title says none."""
    path = _trace(tmp_path)
    doc = json.loads(Path(path).read_text())
    assert "strategy" not in doc  # a Recorder told no strategy writes none, as before
    out = tmp_path / "old.png"
    s = plot_trace(path, str(out))
    assert out.read_bytes()[:8] == PNG
    assert s.title == "restore: 1 faults, 82 pages installed"
    doc["strategy"] = 7
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(SnapshotFormatError, match="field strategy"):
        plot_trace(path, str(out))
