"""``pagein``: the entry point. Subcommands are discovered from the modules of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pagein
import pagein.cli
from pagein.errors import ConfigError, PageinError
from pagein.serve.logs import LogFormat, configure

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _add_log_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The logging flags, on the top parser and on every subcommand's parser.

    On subcommands they default to SUPPRESS, so ``pagein -v serve`` keeps the top
    parser's value and ``pagein serve -v`` sets it: both spellings work.
    """
    sub: Any = argparse.SUPPRESS  # not given after the subcommand: keep the top's value
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else sub,
                        help="more log output (-vv for debug)")
    parser.add_argument("--log-level", choices=list(_LEVELS), default=None if top else sub,
                        help="log level (default warning; overrides -v)")
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat],
                        default=LogFormat.TEXT.value if top else sub,
                        help="text (default) or json: one JSON object per line (time, "
                             "level, logger, message, vm, worker), from every process")


def _sub_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand parser below ``parser`` (``vm restore``, ``lab ...`` included)."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *_sub_parsers(child)]
    return out

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
    values = {i + 1 for i, a in enumerate(argv) if a in ("--log-level", "--log-format")}
    command = next((a for i, a in enumerate(argv) if not a.startswith("-") and i not in values),
                   None)
    return [command] if command in names else names


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; with ``argv``, register only the subcommand it names (if any)."""
    parser = argparse.ArgumentParser(
        prog="pagein",
        description="Restore memory snapshots lazily through userfaultfd: resume at once, "
                    "fill each page on first touch.",
    )
    parser.add_argument("--version", action="version", version=f"pagein {pagein.__version__}")
    _add_log_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules(argv or []):
        module = importlib.import_module(f"pagein.cli.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    for child in _sub_parsers(parser):
        _add_log_flags(child, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if getattr(args, "log_level", None) is not None:
        level = _LEVELS[args.log_level]
    configure(level, LogFormat(args.log_format))
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except ConfigError as e:  # a flag that cannot work as given: like argparse's errors
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    except PageinError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
