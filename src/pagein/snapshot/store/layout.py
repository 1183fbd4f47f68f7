"""A store: a backend plus the key layout shared by push, pull, ls, rm, gc and serving.

Key layout (the same in a directory and in a bucket under its prefix)::

    manifests/NAME.json          one per snapshot (see manifest.py)
    working-sets/NAME.ws         the snapshot's recorded working set, if one was pushed
                                 (a whole working-set file; gc never looks here)
    chunks/ab/abcdef….zst        chunk objects, named by content hash; 'ab' = first
                                 two hex digits, so no directory holds too many files
    pushes/NAME.UUID.json        "a push is under way" markers (deleted when it ends)
    gc/UUID.json                 "a gc is under way" markers (deleted when it ends)

Store URLs: ``s3://bucket[/prefix]``, ``dir:///abs/path`` or a plain path. A snapshot
is named by its store URL plus ``/NAME`` (``s3://bucket/vm1``, ``dir:///srv/store/vm1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pagein.errors import SnapshotFormatError, SourceError
from pagein.snapshot.store.backend import Backend, LocalBackend, RetryPolicy, S3Backend
from pagein.snapshot.store.manifest import Manifest, check_name
from pagein.snapshot.urls import split_location

__all__ = ["STORE_SCHEMES", "StoreOptions", "chunk_key", "digest_of_key", "manifest_key",
           "open_backend", "read_manifest", "split_snapshot_url", "working_set_key"]

#: The URL schemes a store may have (anything else with a colon is refused).
STORE_SCHEMES = ("s3", "dir")
MANIFESTS = "manifests/"
CHUNKS = "chunks/"
PUSHES = "pushes/"
GCS = "gc/"
WORKING_SETS = "working-sets/"


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How to reach a store: S3 endpoint and profile (None: the standard AWS lookup)."""

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_connections: int = 16


def chunk_key(digest: str) -> str:
    """Return the object key of the chunk named ``digest``."""
    return f"{CHUNKS}{digest[:2]}/{digest}.zst"


def digest_of_key(key: str) -> str | None:
    """Return the digest a chunk key names, or None for anything else under chunks/."""
    if not key.startswith(CHUNKS) or not key.endswith(".zst"):
        return None
    d = key.rsplit("/", 1)[-1][:-4]
    return d if len(d) == 64 else None


def manifest_key(name: str) -> str:
    """Return the object key of snapshot ``name``'s manifest."""
    return f"{MANIFESTS}{check_name(name)}.json"


def working_set_key(name: str) -> str:
    """Return the object key of snapshot ``name``'s working-set file."""
    return f"{WORKING_SETS}{check_name(name)}.ws"


def open_backend(url: str, options: StoreOptions = StoreOptions(), *,
                 create: bool = False) -> Backend:
    """Open the store at ``url`` (``s3://bucket[/prefix]``, ``dir:///path`` or a path)."""
    scheme, rest = split_location(url, STORE_SCHEMES, what="store URL",
                                  forms="s3://bucket[/prefix], dir:///abs/path or a path")
    if scheme is None:
        scheme, rest = "dir", url
    if scheme == "dir":
        if not rest:
            raise SourceError(f"store URL {url!r} has no path: use dir:///abs/path")
        return LocalBackend(rest, create=create)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise SourceError(f"store URL {url!r} has no bucket: use s3://bucket[/prefix]")
        return S3Backend(bucket, prefix, endpoint_url=options.endpoint_url,
                         profile=options.profile, region=options.region,
                         retry=options.retry, max_connections=options.max_connections)
    raise SourceError(f"store URL {url!r} has unknown scheme {scheme!r}: use s3://bucket"
                      "[/prefix], dir:///abs/path or a path")


def split_snapshot_url(scheme: str, rest: str) -> tuple[str, str]:
    """Split ``s3``/``dir`` + ``bucket/…/name`` into (store URL, snapshot name)."""
    store, _, name = rest.rstrip("/").rpartition("/")
    if not name or (scheme == "s3" and not store) or (scheme == "dir" and not store
                                                       and not rest.startswith("/")):
        raise SnapshotFormatError(
            f"snapshot URL {scheme}://{rest} names no snapshot: use s3://bucket/name or "
            "dir:///store/path/name")
    check_name(name)
    return f"{scheme}://{store or '/'}", name


def read_manifest(backend: Backend, name: str) -> Manifest:
    """Fetch and parse snapshot ``name``'s manifest, or raise SourceError if it is absent."""
    key = manifest_key(name)
    data = backend.get(key)
    if data is None:
        raise SourceError(f"no snapshot {name!r} in store {backend.url}: see "
                          f"'pagein store ls --store {backend.url}'")
    return Manifest.decode(data, f"{backend.url}/{key}")


def snapshot_names(backend: Backend) -> list[str]:
    """Return the names of every snapshot in the store, sorted."""
    names = []
    for info in backend.list(MANIFESTS):
        base = info.key[len(MANIFESTS):]
        if base.endswith(".json") and "/" not in base:
            names.append(base[:-5])
    return sorted(names)


def host_tag() -> str:
    """Return ``hostname:pid`` for markers (who is pushing or collecting)."""
    return f"{os.uname().nodename}:{os.getpid()}"
