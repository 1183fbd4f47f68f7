"""Open a :class:`~pagein.snapshot.source.PageSource` from what a user types.

- ``/path/to/mem.snap`` or ``file:///path``: a raw memory file (Firecracker layout),
  served from a read-only mapping of the file; holes read as zeros.
- ``/path/to/layer/`` (a directory): a diff snapshot layer, its chain of parents
  resolved, checked and flattened at open (:mod:`pagein.snapshot.chain`).
- ``s3://bucket/name``: a snapshot pushed with ``pagein store push`` to an
  S3-compatible store (endpoint from ``AWS_ENDPOINT_URL`` / ``--endpoint-url``).
- ``dir:///path/to/store/name``: the same, from a local store directory.

Anything else that starts like a URL (``s3:/bucket/name``) is refused, never taken as a
relative path (:mod:`pagein.snapshot.urls`).
"""

from __future__ import annotations

import os

from pagein.errors import SnapshotFormatError
from pagein.snapshot.source import PageSource
from pagein.snapshot.urls import split_location

__all__ = ["SOURCE_SCHEMES", "open_source"]

#: The URL schemes a snapshot source may have (anything else with a colon is refused).
SOURCE_SCHEMES = ("file", "s3", "dir")


def open_source(spec: str, **options: object) -> PageSource:
    """Return the page source ``spec`` names.

    Raises :class:`~pagein.errors.SnapshotFormatError` for an unknown scheme or a URL look-alike
    (``s3:/bucket/name``: see :mod:`pagein.snapshot.urls`), and whatever opening it raises.
    """
    scheme, rest = split_location(
        spec, SOURCE_SCHEMES, what="snapshot source", error=SnapshotFormatError,
        forms="a file path, file:///path, s3://bucket/name or dir:///store/name")
    if scheme in (None, "file") and os.path.isdir(rest):  # a diff chain's directory
        from pagein.snapshot.chain import ChainSource

        return ChainSource(rest)
    if scheme is None or scheme == "file":
        from pagein.snapshot.raw import RawFileSource

        return RawFileSource(rest)
    if scheme in ("s3", "dir"):
        from pagein.snapshot.store import open_store_source

        return open_store_source(scheme, rest, **options)
    raise AssertionError(f"unreachable: scheme {scheme!r} of {SOURCE_SCHEMES}")
