"""The snapshots one ``pagein serve`` daemon serves: ``--config FILE`` (TOML) and
``--snapshot NAME=SOURCE``, each snapshot on a socket of its own.

The file (Python's :mod:`tomllib`; every key optional but ``source``)::

    socket_dir = "/run/pagein"        # sockets are SOCKET_DIR/NAME.sock unless set

    [defaults]                        # fields every snapshot gets unless it sets them
    strategy = "readahead"
    workers = 1

    [snapshots.web]                   # NAME: letters, digits, '.', '_', '-'
    source = "/srv/snapshots/web/memory"   # a path, file://, s3://bucket/name, dir://
    socket = "/run/pagein/web.sock"

    [snapshots.db]
    source = "s3://snapshots/db"
    strategy = "working-set"

A field an entry does not set comes from ``[defaults]``, then from the command line's
flags (``--strategy``, ``--workers``, ...; ``--workers`` is 1 per snapshot unless
given). The fields are the ``pagein serve`` flags of one snapshot, spelled with ``_``
(:data:`FIELDS`). A bad entry is one :class:`~pagein.errors.ConfigError` naming the
file, the entry and the field.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pagein.errors import ConfigError
from pagein.serve.options import ServeOptions

__all__ = ["FIELDS", "MAX_SNAPSHOTS", "Fleet", "load_config", "parse_snapshot_flags"]

MAX_SNAPSHOTS = 256  # entries one daemon serves at most
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
        raise ValueError("must be a non-empty string")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a whole number >= 0")
    return value


def _seconds(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0 \
            or value == float("inf"):
        raise ValueError("must be a number of seconds >= 0")
    return float(value)


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"(\d{1,15})([KMGT]?)(?:i?B)?", value.strip(), re.IGNORECASE) \
        if isinstance(value, str) else None
    if m is not None and int(m.group(1)) > 0:
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise ValueError("must be a size above 0, e.g. 268435456 or \"256M\"")


def _mode(value: object) -> int:
    text = _text(value)
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError("must be an octal mode in a string, e.g. \"0660\"")
    return int(text, 8)


def _ids(value: object) -> list[tuple[int, ...]]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                              and 0 <= i < 2**32 for i in value):
        raise ValueError("must be a list of numeric ids, e.g. [1000, 1001]")
    return [tuple(value)]


#: Every field of a snapshot entry: its ``pagein serve`` flag's namespace attribute and
#: how its value is checked.
FIELDS: dict[str, tuple[str, Callable[[object], object]]] = {
    "source": ("source", _text),
    "socket": ("socket", _text),
    "strategy": ("strategy", _text),
    "readahead_size": ("readahead_size", _size),
    "working_set": ("working_set", _text),
    "then": ("then", _text),
    "record": ("record", _text),
    "trace": ("trace", _text),
    "chunk_size": ("chunk_size", _size),
    "workers": ("workers", _count),
    "max_restarts": ("max_restarts", _count),
    "on_bad_handshake": ("on_bad_handshake", _text),
    "on_vm_failure": ("on_vm_failure", _text),
    "handshake_timeout": ("handshake_timeout", _seconds),
    "page_cache_keep": ("page_cache_keep", _seconds),
    "socket_mode": ("socket_mode", _mode),
    "socket_group": ("socket_group", _count),
    "allow_uid": ("allow_uid", _ids),
    "allow_gid": ("allow_gid", _ids),
    "endpoint_url": ("endpoint_url", _text),
    "profile": ("profile", _text),
    "cache_dir": ("cache_dir", _text),
    "cache_size": ("cache_size", _size),
}
_CHOICES = {"strategy", "then", "on_bad_handshake", "on_vm_failure"}


@dataclass(frozen=True, slots=True)
class Fleet:
    """What to serve: each snapshot's name and options, in the order given."""

    snapshots: dict[str, ServeOptions]
    origin: str  # the file, or "--snapshot"


def _entry(where: str, name: str, fields: Mapping[str, object], base: argparse.Namespace,
           socket_dir: str | None) -> ServeOptions:
    ns = argparse.Namespace(**vars(base))
    ns.mem_file, ns.stats_json, ns.exit_after, ns.metrics_port = None, None, None, None
    if ns.workers is None:
        ns.workers = 1  # a worker per snapshot: N snapshots, N processes, not N per CPU
    ns.socket = None if socket_dir is None else os.path.join(socket_dir, f"{name}.sock")
    for key, value in fields.items():
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown field {key[:40]!r}; the fields are "
                              f"{', '.join(FIELDS)}")
        attr, check = FIELDS[key]
        try:
            setattr(ns, attr, check(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {key} = {str(value)[:60]!r} {e}") from None
    for key in ("source", "socket"):
        if getattr(ns, key) is None:
            hint = " (or set socket_dir, or pass --socket-dir)" if key == "socket" else ""
            raise ConfigError(f"{where}: {key} is missing{hint}")
    try:
        opts = ServeOptions.from_namespace(ns)
        opts.store_options()  # store settings with a file source are refused now
        return opts
    except ConfigError as e:
        raise ConfigError(f"{where}: {_fields_not_flags(str(e))}") from None
    except ValueError as e:  # an enum that is not one of its choices
        bad = next((k for k in _CHOICES if str(getattr(ns, k, None)) in str(e)), "a field")
        raise ConfigError(f"{where}: {bad} = {getattr(ns, bad, '')!r} is not one of its "
                          "choices (see pagein serve --help)") from None


def _fields_not_flags(message: str) -> str:
    """A message of :meth:`ServeOptions.from_namespace` names flags: name fields instead."""
    for key in FIELDS:
        message = re.sub(rf"--{key.replace('_', '-')}\b", key, message)
    return message


def load_config(path: str, base: argparse.Namespace, socket_dir: str | None = None) -> Fleet:
    """Read ``--config FILE``; ``base`` holds the command line's flags (the defaults of
    every entry) and ``socket_dir`` the ``--socket-dir`` flag, which the file's
    ``socket_dir`` gives way to. Raises :class:`ConfigError` naming the entry and field."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not TOML: {e}") from None
    if unknown := sorted(set(doc) - {"socket_dir", "defaults", "snapshots"}):
        raise ConfigError(f"{path}: unknown key {unknown[0][:40]!r} (a file has socket_dir, "
                          "[defaults] and [snapshots.NAME] tables)")
    if "socket_dir" in doc:
        try:
            socket_dir = _text(doc["socket_dir"])
        except ValueError as e:
            raise ConfigError(f"{path}: socket_dir {e}") from None
    defaults = doc.get("defaults", {})
    snapshots = doc.get("snapshots", {})
    for key, table in (("defaults", defaults), ("snapshots", snapshots)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {key} must be a table ([{key}])")
    if not snapshots:
        raise ConfigError(f"{path}: no [snapshots.NAME] entry: nothing to serve")
    if "source" in defaults or "socket" in defaults:
        raise ConfigError(f"{path}: [defaults] cannot set source or socket (one per snapshot)")
    entries: dict[str, Mapping[str, object]] = {}
    for name, fields in snapshots.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: snapshots.{name[:64]} must be a table")
        entries[name] = {**defaults, **fields}
    return Fleet(_checked(entries, base, socket_dir, lambda n: f"{path}: [snapshots.{n}]"),
                 path)


def parse_snapshot_flags(values: list[str], base: argparse.Namespace,
                         socket_dir: str | None) -> Fleet:
    """The ``--snapshot NAME=SOURCE`` flags (sockets in ``--socket-dir``)."""
    entries: dict[str, Mapping[str, object]] = {}
    for v in values:
        name, eq, source = v.partition("=")
        if not eq or not source:
            raise ConfigError(f"--snapshot {v[:80]!r}: give NAME=SOURCE, e.g. "
                              "web=/srv/snapshots/web/memory")
        if name in entries:
            raise ConfigError(f"--snapshot {name[:64]}: given twice")
        entries[name] = {"source": source}
    return Fleet(_checked(entries, base, socket_dir, lambda n: f"--snapshot {n}"),
                 "--snapshot")


def _checked(entries: Mapping[str, Mapping[str, object]], base: argparse.Namespace,
             socket_dir: str | None, where: Callable[[str], str]) -> dict[str, ServeOptions]:
    if len(entries) > MAX_SNAPSHOTS:
        raise ConfigError(f"{len(entries)} snapshots: one daemon serves {MAX_SNAPSHOTS} at most")
    out: dict[str, ServeOptions] = {}
    sockets: dict[str, str] = {}
    for name, fields in entries.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where(name[:64])}: the name must be 1-64 letters, digits, "
                              "'.', '_' or '-' (it names the socket and the metrics)")
        opts = _entry(where(name), name, fields, base, socket_dir)
        path = os.path.abspath(opts.socket_path)
        if path in sockets:
            raise ConfigError(f"{where(name)}: socket {opts.socket_path} is also "
                              f"{sockets[path]}'s: give each snapshot its own")
        sockets[path] = name
        out[name] = opts
    return out
