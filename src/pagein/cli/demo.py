"""``pagein demo``: restore a snapshot eagerly and lazily, verify every byte, print a table."""

from __future__ import annotations

import argparse

from pagein.cli._format import parse_size, table
from pagein.demo import run_demo


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="write a snapshot, restore it eagerly and lazily, verify, compare",
        description="Write a memory snapshot with known content, restore it (1) eagerly with "
                    "read() and (2) lazily through a pagein handler process, verify every "
                    "byte of both, and print what each cost.")
    p.add_argument("--size", type=parse_size, default="256M",
                   help="snapshot size, e.g. 64M, 1G (default 256M)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    result = run_demo(args.size)
    print(f"snapshot: {result.size_bytes >> 20} MiB, every byte verified after each restore\n")
    rows = [[r.method, f"{r.pages:,}", f"{r.faults:,}", f"{r.first_byte_s * 1e3:.2f} ms",
             f"{r.total_s * 1e3:.1f} ms"] for r in result.runs]
    print(table(["restore", "pages", "faults served", "first byte", "all pages touched"], rows))
    eager, lazy = result.runs
    speedup = eager.first_byte_s / lazy.first_byte_s
    print(f"\nlazy restore made the first byte readable {speedup:.0f}x sooner; "
          "it pays one fault round trip per page touched.")
    return 0
