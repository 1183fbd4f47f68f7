"""Logging flags before or after the subcommand, the JSON log format, and the options
that say how a server drains (issue 17)."""

from __future__ import annotations

import json
import logging

import pytest

from pagein.cli.main import _command_modules, build_parser
from pagein.errors import ConfigError
from pagein.serve.logs import LIFECYCLE, JsonFormatter, LogFormat, configure
from pagein.serve.options import ServeOptions
from pagein.serve.strategies import StrategyName, Then

BASE = ["--socket", "/s", "--mem-file", "/m"]


@pytest.mark.parametrize("argv", [
    ["-v", "--log-level", "debug", "--log-format", "json", "serve", *BASE],
    ["serve", "-v", "--log-level", "debug", "--log-format", "json", *BASE],
    ["serve", *BASE, "-v", "--log-format", "json", "--log-level", "debug"],
], ids=["before", "after", "at-the-end"])
def test_log_flags_go_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser(argv).parse_args(argv)
    assert (args.verbose, args.log_level, args.log_format) == (1, "debug", "json")


def test_a_flag_after_the_subcommand_keeps_the_top_value_when_absent() -> None:
    argv = ["-vv", "--log-format", "json", "serve", *BASE]
    args = build_parser(argv).parse_args(argv)
    assert (args.verbose, args.log_format) == (2, "json")


def test_the_subcommand_is_found_after_a_log_flag_value() -> None:
    assert _command_modules(["--log-level", "info", "serve", *BASE]) == ["serve"]
    assert _command_modules(["--log-format", "json", "vm", "restore", "d"]) == ["vm"]


def test_json_lines_carry_time_level_logger_message_vm_and_worker() -> None:
    rec = logging.LogRecord("pagein.serve", logging.ERROR, __file__, 1,
                            "vm pid=%d: bad handshake\n%s", (4242, "x" * 20000), None)
    line = JsonFormatter("worker 3").format(rec)
    doc = json.loads(line)
    assert "\n" not in line  # one object per line, whatever the message holds
    assert doc["level"] == "ERROR" and doc["logger"] == "pagein.serve"
    assert doc["vm"] == 4242 and doc["worker"] == "worker 3"
    assert doc["time"].endswith("Z") and len(doc["message"]) <= 8192  # bounded


def test_the_lifecycle_logger_speaks_at_the_default_level() -> None:
    try:
        configure(logging.WARNING, LogFormat.TEXT)
        assert logging.getLogger(LIFECYCLE).isEnabledFor(logging.INFO)
        assert not logging.getLogger("pagein.serve").isEnabledFor(logging.INFO)
    finally:
        configure(logging.WARNING, LogFormat.TEXT)


def _parse(argv: list[str]) -> ServeOptions:
    return ServeOptions.from_namespace(build_parser(argv).parse_args(argv))


def test_drain_timeout_and_strategy_flags_round_trip() -> None:
    for opts in (ServeOptions("/s", "/m", drain_timeout=2.5),
                 ServeOptions("/s", "/m", strategy=StrategyName.READAHEAD, readahead_bytes=1 << 20),
                 ServeOptions("/s", "/m", strategy=StrategyName.WORKING_SET, working_set="/w",
                              then=Then.POPULATE_ALL, readahead_bytes=1 << 16)):
        assert _parse(opts.to_argv()) == opts
        assert ServeOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts


@pytest.mark.parametrize(("extra", "flag"), [
    (["--readahead-size", "1M"], "--readahead-size"),
    (["--strategy", "reap", "--working-set", "w", "--then", "on-demand"], "--then"),
    (["--strategy", "working-set", "--working-set", "w", "--then", "on-demand",
      "--readahead-size", "1M"], "--readahead-size"),
    (["--strategy", "populate-all", "--record", "ws"], "--record"),
])
def test_a_flag_the_strategy_ignores_is_refused_by_name(extra: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _parse(["serve", *BASE, *extra])
