"""Who may connect: the options and flags that say it, and the bounded refusal log."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pagein.cli.main import build_parser
from pagein.serve.access import Access, RefusalLog
from pagein.serve.options import BadHandshakePolicy, ServeOptions
from pagein.sys.fdpass import PeerCred

ALL_SET = ServeOptions("/run/pagein/s.sock", "/snap/mem", socket_mode=0o640,
                       socket_group=65534, allow_uids=(1000, 1001), allow_gids=(65534,),
                       on_bad_handshake=BadHandshakePolicy.CLOSE, workers=2, exit_after=3,
                       metrics_port=9464, metrics_address="::", metrics_keep_ended_s=2.5,
                       collapse=False)


def _parse(argv: list[str]) -> ServeOptions:
    return ServeOptions.from_namespace(build_parser(argv).parse_args(argv))


@pytest.mark.parametrize("opts", [ALL_SET, ServeOptions("/s", "/m")], ids=["all-set", "default"])
def test_options_round_trip_through_argv_and_json(opts: ServeOptions) -> None:
    assert _parse(opts.to_argv()) == opts
    assert ServeOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts


def test_flags_take_names_comma_lists_and_repeats() -> None:
    got = _parse(["serve", "--socket", "/s", "--mem-file", "/m", "--allow-uid", "nobody,7",
                  "--allow-uid", "8", "--allow-gid", "nogroup", "--socket-group", "nogroup",
                  "--socket-mode", "0660"])
    assert got.allow_uids == (65534, 7, 8) and got.allow_gids == (65534,)
    assert (got.socket_group, got.socket_mode) == (65534, 0o660)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--socket-mode", "999", "not an octal permission mode"),
    ("--socket-mode", "4755", "not an octal permission mode"),
    ("--allow-uid", "no-such-user-here", "neither a uid nor a user name"),
    ("--allow-uid", "1,,2", "not a comma list of uids"),
    ("--allow-gid", "no-such-group-here", "neither a gid nor a group name"),
    ("--socket-group", "99999999999", "out of range"),
])
def test_bad_flags_get_one_clear_error(flag: str, value: str, says: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["serve", "--socket", "/s", "--mem-file", "/m", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err


def test_socket_mode_defaults_and_library_check() -> None:
    assert ServeOptions("/s", "/m").socket_permissions == 0o600
    assert ServeOptions("/s", "/m", socket_group=5).socket_permissions == 0o660
    assert ServeOptions("/s", "/m", socket_group=5, socket_mode=0o640).socket_permissions == 0o640
    with pytest.raises(ValueError, match="--socket-mode 4755"):
        ServeOptions("/s", "/m", socket_mode=0o4755)


def test_allow_list_is_root_own_uid_and_what_was_named() -> None:
    access = ServeOptions("/s", "/m", allow_uids=(1000,), allow_gids=(20,),
                          socket_group=30).access
    assert access.uids == {0, os.geteuid(), 1000} and access.gids == {20, 30}
    assert access.permits(PeerCred(9, 0, 9)) and access.permits(PeerCred(9, 1000, 9))
    assert access.permits(PeerCred(9, 5, 30)) and access.permits(PeerCred(9, 5, 20))
    assert not access.permits(PeerCred(9, 65534, 65534))


def test_refusals_are_logged_in_bounded_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(Access.of(), per_window=5, window_s=10.0, clock=lambda: now[0])
    peer = PeerCred(4242, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="pagein.serve"):
        for _ in range(1000):
            refusals.refused(peer)
        assert len(caplog.records) == 5
        first = caplog.records[0].getMessage()
        assert first.startswith("refused a connection from pid=4242 uid=65534 gid=65534: "
                                "not in the allow-list (uids 0")
        assert "--allow-uid" in first and "closed unread" in first
        now[0] = 10.0
        refusals.refused(peer)
    assert caplog.records[5].getMessage() == (
        "refused a connection from pid=4242 uid=65534 gid=65534: 995 similar line(s) "
        "suppressed in the last 10 s")
    assert len(caplog.records) == 7  # the summary, then the next window's first refusal


def test_refusals_of_many_uids_stay_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that changes uid (or many users at once) still gets a bounded log."""
    refusals = RefusalLog(Access.of(), per_window=5, window_s=10.0, clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="pagein.serve"):
        for uid in range(1000, 2000):
            refusals.refused(PeerCred(uid, uid, uid))
    assert len(caplog.records) == 20  # four uids' worth of lines for all of them


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--metrics-keep-ended", "-1", "not a number of seconds >= 0"),
    ("--metrics-keep-ended", "nan", "not a number of seconds >= 0"),
    ("--metrics-port", "70000", "not a TCP port from 0 to 65535"),
    ("--metrics-port", "-1", "not a TCP port from 0 to 65535"),
])
def test_bad_metrics_flags_are_one_line_naming_the_flag(
        flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parse(["serve", "--socket", "/s", "--mem-file", "/m", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '{value}' is {says}" in err and "Traceback" not in err
