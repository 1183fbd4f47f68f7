"""The diff layer file (pagein.snapshot.chain) and the chain index it records
(pagein.snapshot.chainindex): round trips, an oracle, and refusals that name the field."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagein.errors import IntegrityError, PageinError, SnapshotFormatError
from pagein.snapshot.chain import LayerDoc, encode_layer, pack_pages, read_layer
from pagein.snapshot.chainindex import ZERO, ChainIndex

SHA = "ab" * 32
HEADER = struct.Struct("<8sIIQ32s")


def _doc(pages: list[bool]) -> LayerDoc:
    bits = np.array(pages, dtype=bool)
    index = ChainIndex.of_full(len(pages), [(0, len(pages) * 4096)]).with_layer(
        1, bits, np.zeros_like(bits))
    return LayerDoc("../base", SHA, None, 1, len(pages) * 4096, pack_pages(bits), "cd" * 32,
                    len(index), index.encode())


def _frame(body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return HEADER.pack(b"PGLAYER1", 2, 0, len(raw), hashlib.sha256(raw).digest()) + raw


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, pages: list[bool]) -> None:
    path = tmp_path_factory.mktemp("l") / "layer"
    path.write_bytes(encode_layer(_doc(pages)))
    got = read_layer(str(path))
    assert got.changed_pages().tolist() == pages
    assert got.chain_index().owner_per_page().tolist() == [int(p) for p in pages]
    assert (got.parent_path, got.parent_state_sha256, got.parent_layer_sha256, got.depth,
            got.memory_bytes) == ("../base", SHA, None, 1, len(pages) * 4096)


def _body() -> dict[str, object]:
    index = ChainIndex.of_full(16, [(0, 16 * 4096)])
    return {"parent": {"path": "../b", "state_sha256": SHA, "layer_sha256": None},
            "depth": 1, "memory_bytes": 16 * 4096,
            "pages": base64.b64encode(zlib.compress(b"\0\0")).decode(), "data_sha256": SHA,
            "index": {"runs": len(index), "data": index.encode()}}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("memory_bytes", 4095, "field memory_bytes is 4095"),
    ("depth", 0, "field depth is 0"),
    ("data_sha256", "xyz", "is not a SHA-256 in hex"),
    ("parent", {"path": "", "state_sha256": SHA, "layer_sha256": None},
     "field parent.path is not a directory"),
    ("parent", {"path": "../b", "state_sha256": SHA, "layer_sha256": "no"},
     "parent.layer_sha256 or data_sha256 is not a SHA-256"),
    ("index", {"runs": 1}, "missing or wrong field 'data'"),
])
def test_a_bad_field_is_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    body = _body()
    body[field] = value
    (tmp_path / "layer").write_bytes(_frame(body))
    with pytest.raises(SnapshotFormatError, match=message):
        read_layer(str(tmp_path / "layer"))


def _encoded(lengths: list[int], owners: list[int]) -> str:
    raw = np.array(lengths, "<u8").tobytes() + np.array(owners, "<u2").tobytes()
    return base64.b64encode(zlib.compress(raw)).decode()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pages", "!!", "field pages is not base64 of a zlib stream"),
    ("pages", base64.b64encode(zlib.compress(b"\0\0\0")).decode(),
     "field pages holds 3\\+? bytes, 2 expected for 16 pages"),
    ("pages", base64.b64encode(zlib.compress(b"\0" * 10**6)).decode(),
     "field pages holds 3\\+ bytes, 2 expected"),
    ("index", {"runs": 0, "data": ""}, "field index.runs is 0, not a count in 1..16"),
    ("index", {"runs": 1, "data": "!!"}, "field index.data is not base64 of a zlib stream"),
    ("index", {"runs": 1, "data": base64.b64encode(zlib.compress(b"\0" * 10**6)).decode()},
     "field index.data holds 11\\+ bytes, 10 expected for 1 runs"),
    ("index", {"runs": 2, "data": _encoded([8, 9], [0, 1])},
     "field index runs do not cover the 16 pages once each"),
    ("index", {"runs": 2, "data": _encoded([8, 8], [1, 1])}, "index runs are not maximal"),
    ("index", {"runs": 2, "data": _encoded([8, 8], [0, 2])},
     "field index names layer 2 of a chain 1 deep"),
])
def test_a_bad_bitmap_or_index_is_named_when_decoded(tmp_path: Path, field: str,
                                                     value: object, message: str) -> None:
    """The bitmap and the index are decoded on demand (opening a chain decodes only the
    top layer's index), bounded, with the field named."""
    body = _body()
    body[field] = value
    (tmp_path / "layer").write_bytes(_frame(body))
    doc = read_layer(str(tmp_path / "layer"))
    with pytest.raises(SnapshotFormatError, match=message):
        doc.changed_pages() if field == "pages" else doc.chain_index()


def test_a_flipped_body_byte_is_an_integrity_error(tmp_path: Path) -> None:
    data = bytearray(encode_layer(_doc([True, False] * 8)))
    data[-3] ^= 0x20
    (tmp_path / "layer").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="is corrupted"):
        read_layer(str(tmp_path / "layer"))


def test_an_older_version_is_refused_naming_it(tmp_path: Path) -> None:
    raw = json.dumps(_body()).encode()
    (tmp_path / "layer").write_bytes(
        HEADER.pack(b"PGLAYER1", 1, 0, len(raw), hashlib.sha256(raw).digest()) + raw)
    with pytest.raises(SnapshotFormatError, match="has version 1 flags 0x0; this pagein "
                                                  "reads version 2"):
        read_layer(str(tmp_path / "layer"))


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_garbage_is_refused_with_a_pagein_error(tmp_path_factory: pytest.TempPathFactory,
                                                data: bytes) -> None:
    path = tmp_path_factory.mktemp("g") / "layer"
    path.write_bytes(b"PGLAYER1" + data if data[:1] == b"\0" else data)
    with pytest.raises(PageinError):
        read_layer(str(path))


_LAYER = st.lists(st.sampled_from(["", "d", "z"]), min_size=40, max_size=40)


@given(base=st.lists(st.booleans(), min_size=40, max_size=40),
       layers=st.lists(_LAYER, max_size=6))
def test_the_index_built_layer_by_layer_is_the_top_most_owner(
        base: list[bool], layers: list[list[str]]) -> None:
    """Oracle: for every page walk the layers top down; the first that holds it owns it,
    and it reads as zeros when that layer left it a hole ("z") or the full snapshot has
    a hole there. The index also survives its encoding."""
    extents = [(p * 4096, 4096) for p, data in enumerate(base) if data]
    index = ChainIndex.of_full(40, extents)
    for depth, layer in enumerate(layers, 1):
        pages = np.array([c != "" for c in layer])
        zero = np.array([c == "z" for c in layer])
        index = ChainIndex.decode(index.with_layer(depth, pages, zero).encode(),
                                  len(index.with_layer(depth, pages, zero)), 40)
    owner = index.owner_per_page()
    for page in range(40):
        top = next((d for d in reversed(range(1, len(layers) + 1))
                    if layers[d - 1][page]), 0)
        hole = layers[top - 1][page] == "z" if top else not base[page]
        assert owner[page] == (ZERO if hole else top), page
    runs = index.runs()
    assert sum(n for _, n, _ in runs) == 40 * 4096
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
    assert all(index.run_of(o) == i and index.run_end(i) == o + n
               for i, (o, n, _) in enumerate(runs))
