"""``pagein``: the entry point. Subcommands are discovered from the modules of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Sequence

import pagein
import pagein.cli
from pagein.errors import PageinError

Handler = Callable[[argparse.Namespace], int]


def _command_modules(argv: Sequence[str]) -> list[str]:
    """The subcommand modules to load: only the named one when the command line names one.

    Each module pulls in its layer (numpy for the VMM, boto3 for stores, ...); loading
    them all would add a few hundred ms to every start, including each handler that
    ``restore_lazily`` or a VM restore spawns as ``pagein serve``.
    """
    names = [m.name for m in sorted(pkgutil.iter_modules(pagein.cli.__path__),
                                    key=lambda m: m.name)
             if m.name != "main" and not m.name.startswith("_")]
    command = next((a for a in argv if not a.startswith("-")), None)
    return [command] if command in names else names


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; with ``argv``, register only the subcommand it names (if any)."""
    parser = argparse.ArgumentParser(
        prog="pagein",
        description="Restore memory snapshots lazily through userfaultfd: resume at once, "
                    "fill each page on first touch.",
    )
    parser.add_argument("--version", action="version", version=f"pagein {pagein.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules(argv or []):
        module = importlib.import_module(f"pagein.cli.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except PageinError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
