"""RateLimitedLog: N lines per interval per key, a shared budget, a suppressed count."""

from __future__ import annotations

import logging

import pytest

from pagein.serve.ratelog import RateLimitedLog, peer_text


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_per_key_budget_then_one_suppressed_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), lines=3, interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, "t.ratelog"):
        written = [rl.log(logging.WARNING, 7, "vm pid=7", "garbage %d", i) for i in range(1000)]
        assert written == [True] * 3 + [False] * 997
        assert _lines(caplog) == ["vm pid=7: garbage 0", "vm pid=7: garbage 1",
                                  "vm pid=7: garbage 2"]
        clock.now = 10.5
        rl.log(logging.WARNING, 7, "vm pid=7", "garbage %d", 1000)
        assert _lines(caplog)[3:] == ["vm pid=7: 997 similar line(s) suppressed in the last 10 s",
                                      "vm pid=7: garbage 1000"]


def test_keys_are_independent_and_flush_says_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), lines=1, interval_s=10, clock=_Clock())
    with caplog.at_level(logging.WARNING, "t.ratelog"):
        for _ in range(5):
            rl.log(logging.WARNING, 1, "vm pid=1", "x")
            rl.log(logging.WARNING, 2, "vm pid=2", "y")
        rl.flush(1)
        assert _lines(caplog) == ["vm pid=1: x", "vm pid=2: y",
                                  "vm pid=1: 4 similar line(s) suppressed in the last 10 s"]
        rl.flush()
        assert _lines(caplog)[-1] == "vm pid=2: 4 similar line(s) suppressed in the last 10 s"


def test_many_keys_share_one_total_budget(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that forks for fresh pids is bounded by the shared budget, and the count of
    what it lost is one line, not one per pid."""
    clock = _Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), lines=2, interval_s=1, total_lines=10,
                        max_keys=50, clock=clock)
    with caplog.at_level(logging.WARNING, "t.ratelog"):
        for pid in range(10_000):
            rl.log(logging.WARNING, pid, f"vm pid={pid}", "bad handshake")
        assert len(caplog.records) == 10
        clock.now = 2
        rl.log(logging.WARNING, "x", "x", "again")
        assert _lines(caplog)[10:] == [
            "9990 line(s) from several peers suppressed in the last 1 s", "x: again"]


def test_peer_text_is_escaped_and_bounded() -> None:
    text = peer_text("a\nb\x1b[2J" + "z" * 10_000, 50)
    assert "\n" not in text and "\x1b" not in text and len(text) == 50
    assert peer_text(10 ** 5000).startswith("<integer of")


def test_a_quiet_key_is_reported_when_another_speaks(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), lines=1, interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, "t.ratelog"):
        for _ in range(3):
            rl.log(logging.WARNING, 1, "vm pid=1", "x")
        clock.now = 11
        rl.log(logging.WARNING, 2, "vm pid=2", "y")
        assert _lines(caplog) == ["vm pid=1: x",
                                  "vm pid=1: 2 similar line(s) suppressed in the last 10 s",
                                  "vm pid=2: y"]
