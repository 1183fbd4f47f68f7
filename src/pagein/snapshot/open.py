"""Open a :class:`~pagein.snapshot.source.PageSource` from what a user types.

- ``/path/to/mem.snap`` or ``file:///path``: a raw memory file (Firecracker layout),
  served from a read-only mapping of the file; holes read as zeros.
- ``/path/to/layer/`` (a directory): a diff snapshot layer, its chain of parents
  resolved, checked and flattened at open (:mod:`pagein.snapshot.chain`).
- ``s3://bucket/name``: a snapshot pushed with ``pagein store push`` to an
  S3-compatible store (endpoint from ``AWS_ENDPOINT_URL`` / ``--endpoint-url``).
- ``dir:///path/to/store/name``: the same, from a local store directory.
"""

from __future__ import annotations

import os

from pagein.errors import SnapshotFormatError
from pagein.snapshot.source import PageSource


def open_source(spec: str, **options: object) -> PageSource:
    """Return the page source ``spec`` names; raise SnapshotFormatError for an unknown scheme."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        scheme, rest = "file", spec
    if scheme == "file" and os.path.isdir(rest):
        from pagein.snapshot.chain import ChainSource

        return ChainSource(rest)
    if scheme == "file":
        from pagein.snapshot.raw import RawFileSource

        return RawFileSource(rest)
    if scheme in ("s3", "dir"):
        from pagein.snapshot.store import open_store_source

        return open_store_source(scheme, rest, **options)
    raise SnapshotFormatError(
        f"unknown snapshot source {spec!r}: use a file path, file://, s3://bucket/name or "
        "dir:///store/name")
