"""``pagein lab``: list the experiments; ``pagein lab run NAME`` shows what the kernel did."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from pagein.cli._console import print_table
from pagein.cli._format import parse_size as parse_any_size
from pagein.lab import EXPERIMENTS, Experiment, LabResult, Row, find
from pagein.sys.mapping import PAGE_SIZE

MIB = 1 << 20


def parse_size(text: str) -> int:
    """Parse ``64M``, ``512K``, ``1G`` into bytes, as every pagein command does (a bare
    number is bytes), and require a multiple of the page size."""
    size = parse_any_size(text)
    if size <= 0 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must be a positive multiple of the page size ({PAGE_SIZE} bytes): "
            "give a unit, e.g. 64M")
    return size


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="experiments that show the kernel memory model at work",
                       description="Run the lab: each experiment drives a real kernel "
                                   "mechanism and prints what the kernel did. `pagein lab` "
                                   "alone lists the experiments (docs/lab.md explains each).",
                       epilog="example: pagein lab run demand-paging --size 16M")
    p.set_defaults(handler=_list)
    lsub = p.add_subparsers(dest="lab_command", metavar="run")
    r = lsub.add_parser("run", help="run one experiment",
                        description="Run one experiment and print a table of its steps and "
                                    "the facts it measured.",
                        epilog="example: pagein lab run uffd-fill --size 16M --json")
    r.add_argument("name", choices=[e.name for e in EXPERIMENTS], metavar="NAME",
                   help="one of: " + ", ".join(e.name for e in EXPERIMENTS))
    r.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help="memory the experiment works on: 16M, 512K, 1G, or a bare number "
                        "of bytes, a multiple of 4096 (default 64M)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(handler=_run)


def _list(args: argparse.Namespace) -> int:
    width = max(len(e.name) for e in EXPERIMENTS)
    print("pagein lab: run one with `pagein lab run NAME [--size 64M] [--json]`\n")
    for e in EXPERIMENTS:
        print(f"  {e.name:<{width}}  {e.title}")
    return 0


def _run(args: argparse.Namespace) -> int:
    exp = find(args.name)
    size = args.size or exp.default_size_bytes
    if size < exp.min_size_bytes:
        print(f"pagein lab run {exp.name}: --size must be at least "
              f"{exp.min_size_bytes // MIB} MiB: pass --size {exp.min_size_bytes // MIB}M or "
              "more", file=sys.stderr)
        return 2
    result = exp.run(size)
    if args.json:
        print(json.dumps({"name": exp.name, "title": exp.title,
                          "explanation": list(exp.explanation),
                          "result": dataclasses.asdict(result)},  # type: ignore[call-overload]
                         indent=2))
    else:
        show(exp, result)
    return 0


# --- rendering ------------------------------------------------------------------------


def _time(ns: int) -> str:
    if ns < 10_000:
        return f"{ns} ns"
    if ns < 10_000_000:
        return f"{ns / 1e3:.0f} µs"
    return f"{ns / 1e6:.1f} ms"


_COLUMNS = ("step", "who", "RSS MiB", "present", "PFNs", "minflt", "majflt", "time", "note")


def _cells(row: Row) -> tuple[str, ...]:
    return (row.step, row.who, f"{row.rss_kib / 1024:.1f}", str(row.present_pages),
            str(row.distinct_pfns), str(row.minor_faults), str(row.major_faults),
            _time(row.elapsed_ns), row.note)


_TEXT_COLUMNS = (0, 1, len(_COLUMNS) - 1)  # step, who, note: left; numbers right


def _value(key: str, value: object) -> str:
    """Format one fact, with its unit when the name carries one."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, int):
        return str(value)
    if key.endswith("_kib"):
        return f"{value} KiB" + (f" ({value / 1024:.1f} MiB)" if value >= 1024 else "")
    if key.endswith("_bytes"):
        return f"{value} bytes" + (f" ({value / MIB:g} MiB)" if value >= MIB else "")
    if "_ns" in key:
        return f"{value} ns"
    return str(value)


def _facts(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for f in dataclasses.fields(obj):
        if f.name == "rows":
            continue
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and all(
                isinstance(getattr(value, g.name), int) for g in dataclasses.fields(value)):
            # A block of counters (a handler's stats): one line, zeros left out.
            counts = [f"{g.name.removesuffix('_ns')} "
                      + (_time(n) if g.name.endswith("_ns") else str(n))
                      for g in dataclasses.fields(value) if (n := getattr(value, g.name))]
            out.append((key, ", ".join(counts) or "nothing"))
        elif dataclasses.is_dataclass(value):
            out += _facts(value, key + ".")
        else:
            out.append((key, _value(f.name, value)))
    return out


def show(exp: Experiment, result: LabResult) -> None:
    """The human view: title, the two-line explanation, the table of steps (drawn by
    rich on a terminal, plain aligned columns into a pipe or file), then the facts."""
    print("\n".join([exp.title, "=" * len(exp.title), *exp.explanation, ""]))
    sys.stdout.flush()
    print_table(_COLUMNS, [_cells(r) for r in result.rows], left=_TEXT_COLUMNS, indent="  ")
    facts = _facts(result)
    width = max(len(k) for k, _ in facts)
    print("\n".join(["", "facts:"] + [f"  {k:<{width}}  {v}" for k, v in facts]))
