"""Manifest encode/decode: round trip, and every parse error names the bad field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein.errors import IntegrityError, SnapshotFormatError
from pagein.snapshot.store.manifest import ChunkRef, Manifest, _body_digest, check_chunk_size

HEX = "0123456789abcdef"


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    chunk_size = 1 << draw(st.integers(16, 22))
    count = draw(st.integers(0, 40))
    size = 0 if count == 0 else (count - 1) * chunk_size + draw(st.integers(1, chunk_size))
    digests = st.text(HEX, min_size=64, max_size=64)
    refs = draw(st.lists(st.one_of(st.none(), st.builds(ChunkRef, digests,
                                                         st.integers(1, 1 << 30))),
                         min_size=count, max_size=count))
    name = draw(st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True))
    return Manifest(name, size, chunk_size, tuple(refs), draw(st.floats(0, 2e9)))


@given(manifests())
def test_round_trip(m: Manifest) -> None:
    assert Manifest.decode(m.encode(), "t") == m


def _doc(**body_changes: Any) -> bytes:
    m = Manifest("vm", 3 * 65536 - 5, 65536, (ChunkRef("a" * 64, 10), None, ChunkRef("b" * 64, 7)))
    doc = json.loads(m.encode())
    doc["body"].update(body_changes)
    doc["checksum"] = "blake2b-256:" + _body_digest(doc["body"])
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "../etc"}, "body.name"),
    ({"size_bytes": -1}, "body.size_bytes"),
    ({"size_bytes": "big"}, "body.size_bytes"),
    ({"chunk_size": 65536 * 3}, "body.chunk_size"),
    ({"chunk_size": 8 << 20}, "body.chunk_size"),
    ({"hash": "md5"}, "body.hash"),
    ({"compression": "gzip"}, "body.compression"),
    ({"created_unix": "noon"}, "body.created_unix"),
    ({"chunks": {}}, "body.chunks"),
    ({"chunks": [None, None]}, "body.chunks"),
    ({"chunks": [None, ["zz", 5], None]}, r"body.chunks\[1\]"),
    ({"chunks": [None, None, ["a" * 64, 0]]}, r"body.chunks\[2\]"),
    ({"chunks": [["A" * 64, 3], None, None]}, r"body.chunks\[0\]"),
])
def test_bad_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SnapshotFormatError, match=rf"manifest s3://b/m\.json: field {field}="):
        Manifest.decode(_doc(**change), "s3://b/m.json")


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(body=[]), "body"),
    (lambda d: d.update(checksum=5), "checksum"),
])
def test_bad_top_level_field_is_named(mutate: Any, field: str) -> None:
    doc = json.loads(_doc())
    mutate(doc)
    with pytest.raises(SnapshotFormatError, match=rf"field {field}="):
        Manifest.decode(json.dumps(doc).encode(), "where")


def test_checksum_mismatch_is_integrity_error() -> None:
    doc = json.loads(_doc())
    doc["body"]["size_bytes"] += 1  # edited after the checksum was computed
    with pytest.raises(IntegrityError, match="field checksum does not match"):
        Manifest.decode(json.dumps(doc).encode(), "where")


def test_truncated_manifest_is_format_error() -> None:
    data = _doc()
    with pytest.raises(SnapshotFormatError, match="not valid UTF-8 JSON"):
        Manifest.decode(data[: len(data) // 2], "where")


@pytest.mark.parametrize("size", [0, 4096, 32768, 65536 * 3, 8 << 20])
def test_chunk_size_rule_rejects(size: int) -> None:
    with pytest.raises(SnapshotFormatError, match="power of two from 64K to 4M"):
        check_chunk_size(size)


@pytest.mark.parametrize("size", [64 << 10, 128 << 10, 1 << 20, 4 << 20])
def test_chunk_size_rule_accepts(size: int) -> None:
    assert check_chunk_size(size) == size


def test_chunk_length_last_is_short() -> None:
    m = Manifest.decode(_doc(), "w")
    assert [m.chunk_length(i) for i in range(3)] == [65536, 65536, 65531]
    assert m.stored_bytes == 17
    assert m.referenced() == {"a" * 64, "b" * 64}


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 23), st.text(max_size=8),
                  st.floats(allow_nan=False), st.lists(st.integers(0, 3), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(st.sampled_from(["name", "size_bytes", "chunk_size", "hash", "compression",
                        "created_unix", "chunks"]), _JUNK)
def test_any_bad_value_names_its_field(field: str, value: Any) -> None:
    """Replace one body field with junk (checksum kept valid): either the manifest is
    still valid, or the error names that field (a size that no longer matches the
    chunk list is reported on body.chunks, naming body.size_bytes too)."""
    try:
        m = Manifest.decode(_doc(**{field: value}), "where")
    except IntegrityError:
        raise
    except SnapshotFormatError as e:
        assert f"body.{field}" in str(e), str(e)
    else:  # the junk happened to be acceptable (e.g. another valid name)
        assert isinstance(m, Manifest)
