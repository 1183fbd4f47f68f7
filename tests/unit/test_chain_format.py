"""The diff layer file (pagein.snapshot.chain): round trip, and refusals that name the field."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagein.errors import IntegrityError, PageinError, SnapshotFormatError
from pagein.snapshot.chain import Chain, Layer, LayerDoc, encode_layer, read_layer

SHA = "ab" * 32
HEADER = struct.Struct("<8sIIQ32s")


def _doc(pages: list[bool]) -> LayerDoc:
    return LayerDoc("../base", SHA, len(pages) * 4096, np.array(pages, dtype=bool), "cd" * 32)


def _frame(body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return HEADER.pack(b"PGLAYER1", 1, 0, len(raw), hashlib.sha256(raw).digest()) + raw


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, pages: list[bool]) -> None:
    path = tmp_path_factory.mktemp("l") / "layer"
    path.write_bytes(encode_layer(_doc(pages)))
    got = read_layer(str(path))
    assert got.pages.tolist() == pages
    assert (got.parent_path, got.parent_state_sha256, got.memory_bytes) == (
        "../base", SHA, len(pages) * 4096)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("memory_bytes", 4095, "field memory_bytes is 4095"),
    ("pages", "!!", "field pages is not base64 of a zlib stream"),
    ("pages", base64.b64encode(zlib.compress(b"\0\0\0")).decode(),
     "field pages holds 3\\+? bytes, 2 expected for 16 pages"),
    ("pages", base64.b64encode(zlib.compress(b"\0" * 10**6)).decode(),
     "field pages holds 3\\+ bytes, 2 expected"),
    ("data_sha256", "xyz", "is not a SHA-256 in hex"),
    ("parent", {"path": "", "state_sha256": SHA}, "field parent.path is not a directory"),
])
def test_a_bad_field_is_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    body: dict[str, object] = {"parent": {"path": "../b", "state_sha256": SHA},
                               "memory_bytes": 16 * 4096,
                               "pages": base64.b64encode(zlib.compress(b"\0\0")).decode(),
                               "data_sha256": SHA}
    body[field] = value
    (tmp_path / "layer").write_bytes(_frame(body))
    with pytest.raises(SnapshotFormatError, match=message):
        read_layer(str(tmp_path / "layer"))


def test_a_flipped_body_byte_is_an_integrity_error(tmp_path: Path) -> None:
    data = bytearray(encode_layer(_doc([True, False] * 8)))
    data[-3] ^= 0x20
    (tmp_path / "layer").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="is corrupted"):
        read_layer(str(tmp_path / "layer"))


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_garbage_is_refused_with_a_pagein_error(tmp_path_factory: pytest.TempPathFactory,
                                                data: bytes) -> None:
    path = tmp_path_factory.mktemp("g") / "layer"
    path.write_bytes(b"PGLAYER1" + data if data[:1] == b"\0" else data)
    with pytest.raises(PageinError):
        read_layer(str(path))


@given(st.lists(st.lists(st.booleans(), min_size=64, max_size=64), max_size=6))
def test_flatten_takes_the_top_most_layer(layers: list[list[bool]]) -> None:
    """Oracle: walk the layers top down, page by page."""
    docs = [_doc(p) for p in layers]
    chain = Chain((Layer("/b", None), *(Layer(f"/l{i}", d) for i, d in enumerate(docs))),
                  64 * 4096)
    owner = chain.flatten()
    for page in range(64):
        want = next((i + 1 for i in reversed(range(len(layers))) if layers[i][page]), 0)
        assert owner[page] == want
    runs = chain.runs(owner)
    assert sum(n for _, n, _ in runs) == 64 * 4096
    assert all(owner[o // 4096] == i for o, _, i in runs)
