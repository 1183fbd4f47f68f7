"""``pagein serve --config FILE``: what each snapshot gets (its entry, then [defaults],
then the command line), and one error naming the file, the entry and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagein.cli.main import build_parser
from pagein.errors import ConfigError
from pagein.serve.config import load_config, parse_snapshot_flags
from pagein.serve.strategies import StrategyName


def _args(*flags: str) -> object:
    return build_parser().parse_args(["serve", "--config", "x", *flags])


def test_entry_then_defaults_then_command_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('socket_dir = "/run/p"\n[defaults]\nstrategy = "readahead"\n'
                   '[snapshots.a]\nsource = "/s/a"\nreadahead_size = "64K"\n'
                   '[snapshots.b]\nsource = "s3://b/b"\nstrategy = "on-demand"\n'
                   'socket = "/x/b.sock"\ncache_size = "1G"\n')
    fleet = load_config(str(cfg), _args("--handshake-timeout", "9"))  # type: ignore[arg-type]
    a, b = fleet.snapshots["a"], fleet.snapshots["b"]
    assert (a.socket_path, a.strategy, a.readahead_bytes) == \
        ("/run/p/a.sock", StrategyName.READAHEAD, 64 << 10)
    assert (b.socket_path, b.strategy, b.cache_bytes) == \
        ("/x/b.sock", StrategyName.ON_DEMAND, 1 << 30)
    assert a.handshake_timeout == b.handshake_timeout == 9.0  # from the command line
    assert a.workers == 1  # one worker per snapshot unless given


@pytest.mark.parametrize(("body", "words"), [
    ('[snapshots.a]\nsource = "/s"\nsocket = "/x.sock"\n'
     '[snapshots.b]\nsource = "/t"\nsocket = "/x.sock"\n',
     "[snapshots.b]: socket /x.sock is also a's"),
    ('[snapshots."a b"]\nsource = "/s"\n', "the name must be"),
    ('[snapshots.a]\nsocket = "/x.sock"\n', "[snapshots.a]: source is missing"),
    ('[snapshots.a]\nsource = "/s"\n', "socket is missing (or set socket_dir"),
    ('[defaults]\nsource = "/s"\n[snapshots.a]\nsource = "/s"\n', "[defaults] cannot set"),
    ('colour = 1\n', "unknown key 'colour'"),
    ("socket_dir = 'x'\n", "no [snapshots.NAME] entry"),
    ("[snapshots\n", "not TOML"),
])
def test_one_error_naming_what_to_change(tmp_path: Path, body: str, words: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), _args())  # type: ignore[arg-type]
    assert words in str(e.value) and str(e.value).startswith(str(cfg))


def test_snapshot_flags() -> None:
    fleet = parse_snapshot_flags(["a=/s/a", "b=dir:///st/b"], _args(), "/run/p")  # type: ignore[arg-type]
    assert {n: o.socket_path for n, o in fleet.snapshots.items()} == \
        {"a": "/run/p/a.sock", "b": "/run/p/b.sock"}
    with pytest.raises(ConfigError, match="give NAME=SOURCE"):
        parse_snapshot_flags(["a"], _args(), "/run/p")  # type: ignore[arg-type]
