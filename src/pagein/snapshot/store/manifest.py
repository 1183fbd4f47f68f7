"""The manifest of one pushed snapshot: which chunk holds which range of the memory file.

A manifest is UTF-8 JSON, one object, written once by ``pagein store push`` and never
changed (a new push under the same name replaces it whole)::

    {
      "format":   "pagein-store-manifest",      fixed magic
      "version":  1,                            bumped on incompatible change
      "body": {
        "name":         "vm1-boot",             snapshot name ([A-Za-z0-9._-], <= 128)
        "size_bytes":   268435456,              length of the raw memory file
        "chunk_size":   1048576,                power of two, 64 KiB .. 4 MiB
        "hash":         "blake2b-256",          how chunk names are computed
        "compression":  "zstd",                 how chunk objects are encoded
        "created_unix": 1764170000.5,           push time (informational)
        "chunks": [                             one entry per chunk index, in order
          ["3f9a…64 hex…", 81234],              [content hash, stored (compressed) bytes]
          null,                                 an all-zero chunk: not stored at all
          …
        ],
        "layers": ["…64 hex…", …]               optional: pushed from a chain of diff
                                                layers, the SHA-256 of each layer's state
                                                file, full snapshot first (the chunks
                                                hold the chain flattened)
      },
      "checksum": "blake2b-256:…64 hex…"        hash of the canonical body (below)
    }

Chunk ``i`` covers ``[i * chunk_size, min((i+1) * chunk_size, size_bytes))``; the last
chunk may be short. The content hash is BLAKE2b-256 of the chunk's *uncompressed*
bytes, so identical chunks dedupe regardless of compression settings.

The checksum covers ``json.dumps(body, sort_keys=True, separators=(",", ":"))``
encoded as UTF-8; it catches a truncated or hand-edited manifest before any chunk is
fetched. Every parse error names the field that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from pagein.errors import IntegrityError, SnapshotFormatError

__all__ = [
    "FORMAT",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "VERSION",
    "ChunkRef",
    "Manifest",
    "check_chunk_size",
    "check_name",
]

FORMAT = "pagein-store-manifest"
VERSION = 1
HASH_NAME = "blake2b-256"
COMPRESSION = "zstd"
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A stored chunk: its content hash (hex) and its size in the store (compressed)."""

    digest: str
    stored_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """One snapshot's layout; ``chunks[i]`` is None for an all-zero chunk."""

    name: str
    size_bytes: int
    chunk_size: int
    chunks: tuple[ChunkRef | None, ...]
    created_unix: float = 0.0
    layers: tuple[str, ...] = ()    # a pushed chain: each layer's state SHA-256, bottom first

    def chunk_length(self, index: int) -> int:
        """Return the number of file bytes chunk ``index`` covers (the last may be short)."""
        return min(self.chunk_size, self.size_bytes - index * self.chunk_size)

    def referenced(self) -> set[str]:
        """Return the set of chunk hashes this snapshot needs."""
        return {c.digest for c in self.chunks if c is not None}

    @property
    def stored_bytes(self) -> int:
        """Bytes this snapshot's distinct chunks take in the store (before cross-snapshot dedup)."""
        seen: dict[str, int] = {}
        for c in self.chunks:
            if c is not None:
                seen[c.digest] = c.stored_bytes
        return sum(seen.values())

    def encode(self) -> bytes:
        """Serialise to the JSON layout in the module docstring."""
        body = {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "chunk_size": self.chunk_size,
            "hash": HASH_NAME,
            "compression": COMPRESSION,
            "created_unix": self.created_unix,
            "chunks": [None if c is None else [c.digest, c.stored_bytes] for c in self.chunks],
        }
        if self.layers:  # absent for a plain file: older manifests keep their checksum
            body["layers"] = list(self.layers)
        doc = {"format": FORMAT, "version": VERSION, "body": body,
               "checksum": f"{HASH_NAME}:{_body_digest(body)}"}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest; ``where`` (a URL) goes into every error message.

        Raises SnapshotFormatError naming the bad field, or IntegrityError when the
        checksum does not match the body.
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotFormatError(f"manifest {where} is not valid UTF-8 JSON ({e}); "
                                      "re-push the snapshot") from e
        if not isinstance(doc, dict):
            raise _field_error(where, "(top level)", doc, "must be a JSON object")
        if doc.get("format") != FORMAT:
            raise _field_error(where, "format", doc.get("format"), f"must be {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise _field_error(where, "version", doc.get("version"),
                               f"this pagein reads version {VERSION}; upgrade pagein or re-push")
        body = doc.get("body")
        if not isinstance(body, dict):
            raise _field_error(where, "body", body, "must be a JSON object")
        checksum = doc.get("checksum")
        if not isinstance(checksum, str) or not checksum.startswith(f"{HASH_NAME}:"):
            raise _field_error(where, "checksum", checksum, f"must be '{HASH_NAME}:<64 hex>'")
        if checksum != f"{HASH_NAME}:{_body_digest(body)}":
            raise IntegrityError(f"manifest {where}: field checksum does not match the body "
                                 "(truncated or edited); re-push the snapshot")
        return _decode_body(body, where)


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid snapshot name, else raise SnapshotFormatError."""
    if not _NAME.fullmatch(name):
        raise SnapshotFormatError(
            f"snapshot name {name!r} is invalid: use 1-128 of A-Z a-z 0-9 . _ - "
            "not starting with '.'")
    return name


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a power of two in 64 KiB..4 MiB, else raise."""
    if (chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE
            or chunk_size & (chunk_size - 1)):
        raise SnapshotFormatError(
            f"chunk size {chunk_size} is invalid: use a power of two from 64K to 4M")
    return chunk_size


def _body_digest(body: object) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canon, digest_size=32).hexdigest()


def _field_error(where: str, field: str, value: object, why: str) -> SnapshotFormatError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return SnapshotFormatError(f"manifest {where}: field {field}={shown} {why}")


def _int_field(body: dict[str, object], field: str, where: str) -> int:
    value = body.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _field_error(where, f"body.{field}", value, "must be a non-negative integer")
    return value


def _decode_body(body: dict[str, object], where: str) -> Manifest:
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _field_error(where, "body.name", name, "must be 1-128 of A-Z a-z 0-9 . _ -")
    size = _int_field(body, "size_bytes", where)
    chunk_size = _int_field(body, "chunk_size", where)
    if (chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE
            or chunk_size & (chunk_size - 1)):
        raise _field_error(where, "body.chunk_size", chunk_size,
                           "must be a power of two from 65536 to 4194304")
    if body.get("hash") != HASH_NAME:
        raise _field_error(where, "body.hash", body.get("hash"), f"must be {HASH_NAME!r}")
    if body.get("compression") != COMPRESSION:
        raise _field_error(where, "body.compression", body.get("compression"),
                           f"must be {COMPRESSION!r}")
    created = body.get("created_unix", 0.0)
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise _field_error(where, "body.created_unix", created, "must be a number")
    raw_chunks = body.get("chunks")
    if not isinstance(raw_chunks, list):
        raise _field_error(where, "body.chunks", raw_chunks, "must be a list")
    expected = -(-size // chunk_size)
    if len(raw_chunks) != expected:
        raise _field_error(where, "body.chunks", f"<{len(raw_chunks)} entries>",
                           f"must have {expected} entries for body.size_bytes={size} "
                           f"and body.chunk_size={chunk_size}")
    chunks: list[ChunkRef | None] = []
    for i, entry in enumerate(raw_chunks):
        if entry is None:
            chunks.append(None)
            continue
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not _HEX64.fullmatch(entry[0]) or not isinstance(entry[1], int)
                or isinstance(entry[1], bool) or entry[1] <= 0):
            raise _field_error(where, f"body.chunks[{i}]", entry,
                               "must be null or [64 lowercase hex digits, positive size]")
        chunks.append(ChunkRef(entry[0], entry[1]))
    layers = body.get("layers", [])
    if not isinstance(layers, list) or len(layers) > 65536 or not all(
            isinstance(x, str) and _HEX64.fullmatch(x) for x in layers):
        raise _field_error(where, "body.layers", layers,
                           "must be a list of SHA-256 hex digests (one per layer)")
    return Manifest(name, size, chunk_size, tuple(chunks), float(created), tuple(layers))
