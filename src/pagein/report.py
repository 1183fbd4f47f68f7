"""Pictures of restores: a fault trace over time, and a strategy comparison as bars.

:func:`plot_trace` draws every page fill of a trace (``pagein serve --trace`` or
``--record``) as a point: time since the VM connected on x, offset in the memory file
on y, coloured by how the page arrived (demand fault, readahead, working-set prefetch,
background population, zero page). A good working-set restore shows a dense prefetch
band at the start and few demand points after it. The title names the strategy the
trace was served with (traces written before they recorded it say nothing of it), and
the legend sits beside the axes, never over the points.

The time axis is symlog: linear up to 0.1 ms, logarithmic beyond. Most pages of a
restore arrive in its first milliseconds (the guest's first touches, a prefetch plan's
first chunks), and on a linear axis of a multi-second restore they collapse into one
column at x=0. A log axis would spread them, one decade per width, but it cannot show
t=0 and the first fills sit at a few microseconds. An inset would repeat the points
and hide a corner of the main picture. symlog keeps one picture in which the first
millisecond and the last second are both readable and t=0 still has a place.

:func:`plot_compare` draws the results JSON of ``benchmarks/working_set.py`` as bars:
time to the first answer and to the end of the request burst, per restore method.

Needs matplotlib (the ``plot`` extra); it is imported here only, with the Agg backend.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pagein.errors import PageinError, SnapshotFormatError, Unavailable
from pagein.serve.cause import Cause
from pagein.serve.record import Trace, load_trace

__all__ = ["CompareSummary", "TraceSummary", "draw_trace", "plot_compare", "plot_trace",
           "trace_title"]

COLOURS = {Cause.DEMAND: "#d62728", Cause.READAHEAD: "#ff7f0e",
           Cause.PREFETCH: "#2ca02c", Cause.BACKGROUND: "#1f77b4",
           Cause.ZERO: "#7f7f7f"}


@dataclass(frozen=True, slots=True)
class TraceSummary:
    faults: int
    pages: dict[str, int]  # pages installed per cause
    duration_ms: float
    title: str


@dataclass(frozen=True, slots=True)
class CompareSummary:
    rows: int


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise Unavailable("pagein report needs matplotlib: pip install 'pagein[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: Below this many milliseconds the time axis is linear, above it logarithmic.
LINEAR_BELOW_MS = 0.1


def trace_title(trace: Trace) -> str:
    """The picture's title: the strategy (when the trace names it) and what happened."""
    pages = sum(f.pages for f in trace.fills)
    what = f"{len(trace.faults)} faults, {pages} pages installed"
    return f"restore with {trace.strategy}: {what}" if trace.strategy else f"restore: {what}"


def draw_trace(trace: Trace, *, title: str | None = None) -> tuple[Any, Counter[str]]:
    """Draw ``trace`` on a new figure; return it and the pages drawn per cause."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    pages: Counter[str] = Counter()
    # Demand faults last, so they are drawn on top of the bulk fills around them.
    for cause in sorted(Cause, key=lambda a: a is Cause.DEMAND):
        xs: list[float] = []
        ys: list[float] = []
        for f in trace.fills:
            if f.cause is not cause:
                continue
            pages[cause.label] += f.pages
            # One point per page, capped per fill so a 1 GiB populate stays drawable.
            step = max(1, f.pages // 64)
            for i in range(0, f.pages, step):
                xs.append(f.time_us / 1e3)
                ys.append((f.offset + i * trace.page_size) / (1 << 20))
        if xs:
            ax.scatter(xs, ys, s=3 if cause is not Cause.DEMAND else 14, marker=".",
                       color=COLOURS[cause], label=f"{cause.label} ({pages[cause.label]})",
                       linewidths=0)
    ax.set_xscale("symlog", linthresh=LINEAR_BELOW_MS)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, not 10^-1
    ax.set_xlabel(f"time since the VM connected (ms; linear below {LINEAR_BELOW_MS:g} ms, "
                  "logarithmic above)")
    ax.set_ylabel("offset in the memory file (MiB)")
    ax.set_title(title or trace_title(trace))
    if pages:  # beside the axes, never over the points
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  markerscale=4, title="how each page arrived")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, pages


def plot_trace(trace_path: str, out: str, *, title: str | None = None) -> TraceSummary:
    """Draw the trace at ``trace_path`` as a PNG at ``out``; return what it showed."""
    trace = load_trace(trace_path)
    fig, pages = draw_trace(trace, title=title)
    drawn = fig.axes[0].get_title()
    _save(fig, out)
    _pyplot().close(fig)
    end = max((f.time_us for f in trace.fills), default=0)
    return TraceSummary(len(trace.faults), dict(pages), end / 1e3, drawn)


def _save(fig: Any, out: str) -> None:
    try:
        fig.savefig(out)
    except OSError as e:
        raise PageinError(f"cannot write --out {out}: {e.strerror}") from e


def _rows(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SnapshotFormatError(f"cannot read results {path}: {e}") from e
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and {"label", "first_answer_ms", "burst_ms"} <= r.keys()
            for r in rows):
        raise SnapshotFormatError(f"{path} has no rows with label, first_answer_ms and "
                                  "burst_ms: pass the --json of benchmarks/working_set.py")
    return rows


def plot_compare(results_path: str, out: str) -> CompareSummary:
    """Draw the strategy comparison in ``results_path`` as horizontal bars at ``out``."""
    rows = _rows(results_path)
    plt = _pyplot()
    labels = [f"{r['label']}" + (f" [mix {r['mix']}]" if r.get("mix") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5), dpi=110)
    ys = list(range(len(rows)))[::-1]
    ax.barh([y + 0.2 for y in ys], [float(r["burst_ms"]) for r in rows], height=0.4,
            color="#1f77b4", label="request burst done")
    ax.barh([y - 0.2 for y in ys], [float(r["first_answer_ms"]) for r in rows], height=0.4,
            color="#2ca02c", label="first answer")
    for y, r in zip(ys, rows, strict=True):
        ax.text(float(r["burst_ms"]), y + 0.2, f" {float(r['burst_ms']):.0f}", va="center",
                fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("ms from the start of the restore (lower is better)")
    ax.set_title("restore strategies on the function guest")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return CompareSummary(len(rows))
