"""Snapshot stores: compressed, deduplicated chunks in a directory or an S3 bucket.

``pagein store push`` cuts a memory file into fixed-size chunks, leaves all-zero
chunks out, compresses the rest with zstd, names each by its content hash and
writes a manifest; identical chunks across snapshots are stored once. A pushed
snapshot is served through :func:`open_store_source` (``s3://bucket/name``,
``dir:///store/name``) from a host-wide, size-bounded cache. See docs/store.md.

Modules: :mod:`.manifest` (format), :mod:`.chunker` (chunking, encoding,
verification), :mod:`.backend` (directory and S3), :mod:`.layout` (keys, URLs),
:mod:`.ops` (push/pull/ls/rm/gc), :mod:`.cache` (host cache), :mod:`.source`
(the PageSource).
"""

from __future__ import annotations

import os
from pathlib import Path

from pagein.errors import SourceError
from pagein.snapshot.store.backend import RetryPolicy
from pagein.snapshot.store.cache import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MEMORY_BYTES,
    ChunkCache,
    default_cache_dir,
)
from pagein.snapshot.store.layout import (
    StoreOptions,
    open_backend,
    read_manifest,
    split_snapshot_url,
)
from pagein.snapshot.store.source import ChunkedSource

__all__ = ["OPTIONS", "ChunkedSource", "open_store_source"]

#: Every option :func:`open_store_source` accepts, with its type and default.
OPTIONS: dict[str, str] = {
    "endpoint_url": "str | None: S3 endpoint; default AWS_ENDPOINT_URL(_S3) or AWS itself",
    "profile": "str | None: AWS profile for credentials; default AWS_PROFILE / env / role",
    "region": "str | None: signing region; default the profile's, else us-east-1",
    "cache_dir": "str | Path | None: disk cache dir; default $PAGEIN_CACHE_DIR or "
                 "/var/cache/pagein/chunks (root); None or '' disables the disk cache",
    "cache_memory_bytes": f"int: in-memory LRU bound per process (default {DEFAULT_MEMORY_BYTES})",
    "cache_disk_bytes": f"int: disk cache bound (default {DEFAULT_DISK_BYTES})",
    "workers": "int: concurrent chunk fetches (default 8)",
    "retries": "int: attempts per store request before SourceError (default 5)",
}

_UNSET = object()


def _opt_str(options: dict[str, object], name: str) -> str | None:
    value = options.get(name)
    if value is None or isinstance(value, str):
        return value or None
    raise SourceError(f"store option {name}={value!r} must be a string")


def _opt_int(options: dict[str, object], name: str, default: int) -> int:
    value = options.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SourceError(f"store option {name}={value!r} must be a positive integer")
    return value


def open_store_source(scheme: str, rest: str, **options: object) -> ChunkedSource:
    """Open snapshot ``scheme://rest`` (``s3://bucket[/prefix]/name``, ``dir:///path/name``).

    Options are listed in :data:`OPTIONS`. Reads the manifest now, so a wrong name,
    an unreachable store or bad credentials fail here with one SourceError (or
    SnapshotFormatError for a bad manifest) rather than on the first fault.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SourceError(f"unknown store option(s) {', '.join(unknown)}: use "
                          f"{', '.join(OPTIONS)}")
    store_url, name = split_snapshot_url(scheme, rest)
    workers = _opt_int(options, "workers", 8)
    store_opts = StoreOptions(
        endpoint_url=_opt_str(options, "endpoint_url"),
        profile=_opt_str(options, "profile"),
        region=_opt_str(options, "region"),
        retry=RetryPolicy(attempts=_opt_int(options, "retries", 5)),
        max_connections=workers + 4,
    )
    raw_dir = options.get("cache_dir", _UNSET)
    if raw_dir is _UNSET:
        cache_dir: Path | None = default_cache_dir()
    elif raw_dir is None or raw_dir == "":
        cache_dir = None
    elif isinstance(raw_dir, str | os.PathLike):
        cache_dir = Path(raw_dir)
    else:
        raise SourceError(f"store option cache_dir={raw_dir!r} must be a path or None")
    mem = _opt_int(options, "cache_memory_bytes", DEFAULT_MEMORY_BYTES)
    disk = _opt_int(options, "cache_disk_bytes", DEFAULT_DISK_BYTES)
    try:
        cache = ChunkCache.shared(cache_dir, memory_bytes=mem, disk_bytes=disk)
    except OSError as e:
        raise SourceError(f"cannot create the chunk cache directory {cache_dir}: {e}; set "
                          "cache_dir (or PAGEIN_CACHE_DIR) to a writable directory") from e
    backend = open_backend(store_url, store_opts)
    try:
        manifest = read_manifest(backend, name)
    except BaseException:
        backend.close()
        raise
    return ChunkedSource(backend, manifest, cache, workers=workers,
                         where=f"{store_url.rstrip('/')}/{name}")
