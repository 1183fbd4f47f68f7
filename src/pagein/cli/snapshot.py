"""``pagein snapshot``: work on snapshot directories (``squash`` a chain of diff layers)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pagein.cli._format import command_group
from pagein.errors import PageinError


def register(sub: Any) -> None:
    s = command_group(
        sub, "snapshot", help="work on VM snapshot directories (squash a chain of diffs)",
        description="Tools for snapshot directories written by `pagein vm snapshot` "
                    "(docs/restore.md).")
    p = s.add_parser(
        "squash", help="fold a chain of diff layers into one full snapshot",
        description="Resolve the chain under the diff layer DIR (every parent checked), and\n"
                    "write one full snapshot into --out that restores exactly as DIR does,\n"
                    "with no parents. DIR itself is left as it is.",
        epilog="example:\n"
               "  pagein vm snapshot --control /tmp/vm.sock --out /snap/d7 --diff\n"
               "  pagein snapshot squash /snap/d7 --out /snap/full7\n"
               "  pagein vm restore /snap/full7",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="DIR", help="a diff layer (or a full snapshot)")
    p.add_argument("--out", required=True, metavar="FULL",
                   help="directory to write the full snapshot into (not a layer of the chain)")
    p.set_defaults(handler=squash_command)


def squash_command(args: argparse.Namespace) -> int:
    from pagein.snapshot.chain import resolve_chain
    from pagein.vmm.layers import squash

    t0 = time.perf_counter()
    try:
        depth = resolve_chain(args.snapshot).depth
        snap = squash(args.snapshot, args.out)
    except (ValueError, PageinError, OSError) as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(f"squashed {depth} diff layers into {args.out}: {snap.memory_bytes >> 20} MiB "
          f"memory in {time.perf_counter() - t0:.2f} s")
    return 0
