"""``pagein report``: draw a restore's fault trace, or compare strategies, as a PNG."""

from __future__ import annotations

import argparse
from typing import Any

from pagein.errors import PageinError
from pagein.report import plot_compare, plot_trace


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="draw a restore trace or a strategy comparison as a PNG",
        description="pagein report TRACE --out restore.png draws every page of a restore "
                    "(pagein serve --trace/--record) over time by offset, coloured by how it "
                    "arrived; pagein report --compare RESULTS.json --out bars.png draws the "
                    "results of benchmarks/working_set.py as bars.")
    p.add_argument("trace", nargs="?", metavar="TRACE", help="a trace file (JSON)")
    p.add_argument("--compare", metavar="RESULTS", help="results JSON of the benchmark")
    p.add_argument("--out", required=True, metavar="PNG", help="image to write")
    p.add_argument("--title", help="title of the trace picture")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if (args.trace is None) == (args.compare is None):
        raise PageinError("give either a TRACE file or --compare RESULTS.json (not both)")
    if args.compare is not None:
        c = plot_compare(args.compare, args.out)
        print(f"{args.out}: {c.rows} restore methods compared")
        return 0
    s = plot_trace(args.trace, args.out, title=args.title)
    pages = ", ".join(f"{k} {v}" for k, v in sorted(s.pages.items()))
    print(f"{args.out}: {s.title}; {s.faults} faults over {s.duration_ms:.1f} ms; pages by "
          f"arrival: {pages}")
    return 0
