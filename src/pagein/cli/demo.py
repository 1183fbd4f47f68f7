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


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _run(args: argparse.Namespace) -> int:
    print(f"writing a {args.size >> 20} MiB snapshot with known content, then restoring it "
          "4 ways...", flush=True)
    result = run_demo(args.size)
    print("every byte verified after each restore\n")
    rows = [[r.method, _ms(r.ready_s), _ms(r.first_byte_s), _ms(r.tenth_s), _ms(r.total_s),
             f"{r.faults:,}"] for r in result.runs]
    print(table(["restore", "usable after", "first byte", "random 10% read", "all pages read",
                 "faults served"], rows))
    eager, lazy = result.runs[0], result.runs[1:]
    best = min(lazy, key=lambda r: r.tenth_s)
    print(f"\nEager: the memory is usable after {_ms(eager.ready_s)}, when all of it is copied."
          f"\nLazy: usable at once; the first byte took {_ms(lazy[0].first_byte_s)}, a random "
          f"10% of the pages {_ms(best.tenth_s)} ({best.method}).\n"
          "Each first touch costs a fault round trip; readahead and background population "
          "amortise it.\n(Lazy times exclude starting the handler process, which is a "
          "long-running daemon in a fleet.)")
    return 0
