"""Small helpers shared by the subcommands: sizes, aligned tables, command groups."""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Sequence
from typing import Any

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``64M``, ``1G``, ``4096`` or ``2MiB`` into bytes (argparse type)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number with K, M or G, e.g. 256M")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          left: Collection[int] = (0,)) -> str:
    """Render an aligned text table: the ``left`` columns (text) left-aligned, the rest
    (numbers) right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i in left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def command_group(sub: Any, name: str, *, help: str, description: str,
                  epilog: str | None = None) -> Any:
    """Add ``pagein NAME`` with subcommands of its own and return their subparsers;
    ``pagein NAME`` alone prints its help and exits 2 (no action is not success)."""
    group = sub.add_parser(name, help=help, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    group.set_defaults(handler=lambda args: (group.print_help(), 2)[1])
    metavar = f"{name.upper()}_COMMAND"
    return group.add_subparsers(dest=f"{name}_command", metavar=metavar)
