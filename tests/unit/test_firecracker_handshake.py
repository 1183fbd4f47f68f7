"""Firecracker handshake payloads: the three generations, completeness, validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein.errors import HandshakeError
from pagein.serve.firecracker import (
    ArrayScanner,
    Generation,
    Region,
    encode_regions,
    json_end,
    parse_regions,
    validate_regions,
)

MIB = 1 << 20
HUGE = 2 * MIB

regions_st = st.lists(
    st.builds(Region,
              base_address=st.integers(0, 1 << 47).map(lambda x: x * 4096),
              size_bytes=st.integers(1, 1 << 20).map(lambda x: x * 4096),
              offset=st.integers(0, 1 << 30).map(lambda x: x * 4096),
              page_size=st.sampled_from([4096, HUGE])),
    min_size=1, max_size=40)


@given(regions_st, st.sampled_from([Generation.CURRENT, Generation.LEGACY_KIB]))
def test_encode_parse_roundtrip_with_page_fields(regions: list[Region], gen: Generation) -> None:
    assert parse_regions(encode_regions(regions, gen)) == regions


@given(regions_st)
def test_original_generation_means_4096(regions: list[Region]) -> None:
    got = parse_regions(encode_regions(regions, Generation.ORIGINAL))
    assert [r.page_size for r in got] == [4096] * len(regions)
    assert [(r.base_address, r.size_bytes, r.offset) for r in got] == \
        [(r.base_address, r.size_bytes, r.offset) for r in regions]


def test_wire_names_per_generation() -> None:
    r = [Region(0x1000, 0x2000, 0x3000, HUGE)]
    assert json.loads(encode_regions(r, Generation.CURRENT)) == [
        {"base_host_virt_addr": 0x1000, "size": 0x2000, "offset": 0x3000,
         "page_size": HUGE, "page_size_kib": HUGE}]
    assert "page_size\"" not in encode_regions(r, Generation.LEGACY_KIB).decode()
    assert "page_size" not in encode_regions(r, Generation.ORIGINAL).decode()


def test_legacy_kib_field_holds_bytes() -> None:
    payload = (b'[{"base_host_virt_addr": 0, "size": 4194304, "offset": 0, '
               b'"page_size_kib": 2097152}]')
    assert parse_regions(payload) == [Region(0, 4 * MIB, 0, HUGE)]


@given(regions_st, st.sampled_from(list(Generation)))
def test_json_end_finds_the_end_only_when_complete(regions: list[Region], gen: Generation) -> None:
    payload = encode_regions(regions, gen)
    for cut in range(0, len(payload), max(1, len(payload) // 50)):
        assert json_end(payload[:cut]) is None
    assert json_end(payload) == len(payload)
    assert json_end(b"  \n" + payload + b'{"pagein"') == len(payload) + 3


def test_json_end_ignores_brackets_inside_strings() -> None:
    tricky = b'[{"x": "]}\\"]"}, 1]'
    assert json_end(tricky[:-1]) is None
    assert json_end(tricky) == len(tricky)


def test_json_end_rejects_non_array_at_once() -> None:
    with pytest.raises(HandshakeError) as e:
        json_end(b'{"a": 1}')
    assert e.value.field == "payload"


@pytest.mark.parametrize(("payload", "field"), [
    (b"[1]", "regions[0]"),
    (b'[{"size": 1, "offset": 0}]', "regions[0].base_host_virt_addr"),
    (b'[{"base_host_virt_addr": 0, "offset": 0}]', "regions[0].size"),
    (b'[{"base_host_virt_addr": 0, "size": 4096}]', "regions[0].offset"),
    (b'[{"base_host_virt_addr": true, "size": 4096, "offset": 0}]',
     "regions[0].base_host_virt_addr"),
    (b'[{"base_host_virt_addr": 0, "size": -4096, "offset": 0}]', "regions[0].size"),
    (b'[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": "4k"}]',
     "regions[0].page_size"),
    (b'[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": 4096, '
     b'"page_size_kib": 4}]', "regions[0].page_size_kib"),
    (b"[]", "payload"),
    (b"[", "payload"),
    (b"\xff\xfe", "payload"),
])
def test_parse_names_the_bad_field(payload: bytes, field: str) -> None:
    with pytest.raises(HandshakeError) as e:
        parse_regions(payload)
    assert e.value.field == field
    assert field in str(e.value)


@pytest.mark.parametrize(("regions", "field"), [
    ([Region(0, 4096, 0, 8192)], "regions[0].page_size"),
    ([Region(0, 0, 0)], "regions[0].size"),
    ([Region(100, 4096, 0)], "regions[0].base_host_virt_addr"),
    ([Region(0, 4095, 0)], "regions[0].size"),
    ([Region(0, 4096, 1)], "regions[0].offset"),
    ([Region(0, HUGE, 4096, HUGE)], "regions[0].offset"),
    ([Region(0, 4096, MIB)], "regions[0].offset"),
    ([Region(0, 8192, 0), Region(4096, 4096, 8192)], "regions[1].base_host_virt_addr"),
    ([Region(0, 8192, 0), Region(MIB, 4096, 4096)], "regions[1].offset"),
    ([Region(0x5000, 8192, 0), Region(0, 0x6000, 8192)], "regions[1].base_host_virt_addr"),
])
def test_validate_names_the_bad_field(regions: list[Region], field: str) -> None:
    with pytest.raises(HandshakeError) as e:
        validate_regions(regions, MIB)
    assert e.value.field == field


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), min_size=1, max_size=8))
def test_validate_overlap_oracle(spans: list[tuple[int, int]]) -> None:
    """Regions (in pages) are accepted exactly when no two address ranges overlap."""
    regions = [Region(a * 4096, n * 4096, i * 64 * 4096) for i, (a, n) in enumerate(spans)]
    pages = [set(range(a, a + n)) for a, n in spans]
    overlap = any(pages[i] & pages[j] for i in range(len(pages)) for j in range(i))
    try:
        validate_regions(regions, 64 * 4096 * len(spans))
    except HandshakeError as e:
        assert overlap and e.field.endswith("base_host_virt_addr")
    else:
        assert not overlap


def test_valid_layout_passes() -> None:
    validate_regions([Region(0x7F0000000000, HUGE, 0, HUGE), Region(0x1000, 4096, HUGE)],
                     HUGE + 4096)


@given(regions_st, st.lists(st.integers(1, 200), max_size=30))
def test_scanner_fed_in_pieces_finds_the_same_end(regions: list[Region], cuts: list[int]) -> None:
    payload = b"\n [" + b'{"note": "a]\\\\\\"}[", "x": []},' + encode_regions(regions)[1:]
    trailer = b'{"pagein": "stats"}\n'
    stream = payload + trailer
    scanner = ArrayScanner(max_depth=3)  # the note's object holds an array
    pos, end = 0, None
    for n in [*cuts, len(stream)]:
        piece = stream[pos:pos + n]
        pos += len(piece)
        end = scanner.feed(piece)
        if end is not None:
            break
    assert end == len(payload)
    assert json.loads(stream[:end])[0]["note"] == 'a]\\"}['


def test_connect_and_send_names_the_socket_nobody_listens_on(tmp_path: Path) -> None:
    from pagein.errors import HandlerError
    from pagein.serve.firecracker import connect_and_send

    path = str(tmp_path / "none.sock")
    with pytest.raises(HandlerError, match=rf"no UFFD handler listens on {re.escape(path)} "):
        connect_and_send(path, [Region(0x10000, 4096, 0, 4096)], 0)
