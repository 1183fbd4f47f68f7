"""Hostile handshakes: whatever bytes a peer sends, the decoder returns regions or raises
HandshakeError naming what was wrong. No other exception, ever (issue 13, finding 4)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagein.errors import HandshakeError
from pagein.serve.firecracker import (
    MAX_DEPTH,
    MAX_HANDSHAKE_BYTES,
    MAX_REGIONS,
    ArrayScanner,
    Generation,
    Region,
    encode_regions,
    parse_regions,
)

REGION = b'{"base_host_virt_addr": 0, "size": 4096, "offset": 0}'

# (case id, payload, the field the error must name, a word the reason must hold)
CORPUS: list[tuple[str, bytes, str, str]] = [
    # The two escapes reproduced in the review: RecursionError and ValueError.
    ("nested-1000", b"[" * 1000 + b"]" * 1000, "payload", "depth"),
    ("nested-100000-unclosed", b"[" * 100_000, "payload", "depth"),
    ("int-4301-digits", b'[{"base_host_virt_addr": ' + b"9" * 4301 + b', "size": 4096, '
     b'"offset": 0}]', "regions[0].base_host_virt_addr", "64-bit"),
    ("int-100k-digits-top", b"[" + b"1" * 100_000 + b"]", "regions[0]", "object"),
    ("nested-in-object", b'[{"size": [[[[1]]]]}]', "payload", "depth"),
    ("object-in-object", b'[{"size": {"a": 1}}]', "payload", "depth"),
    ("float-size", b'[{"base_host_virt_addr": 0, "size": 4096.0, "offset": 0}]',
     "regions[0].size", "integer"),
    ("huge-exponent", b'[{"base_host_virt_addr": 0, "size": 1e999999, "offset": 0}]',
     "regions[0].size", "integer"),
    ("long-float", b'[{"base_host_virt_addr": 0, "size": 0.' + b"5" * 5000 + b', "offset": 0}]',
     "regions[0].size", "64-bit"),
    ("nan", b'[{"base_host_virt_addr": NaN, "size": 4096, "offset": 0}]',
     "regions[0].base_host_virt_addr", "integer"),
    ("negative", b'[{"base_host_virt_addr": -1, "size": 4096, "offset": 0}]',
     "regions[0].base_host_virt_addr", "unsigned"),
    ("2**64", b'[{"base_host_virt_addr": 18446744073709551616, "size": 4096, "offset": 0}]',
     "regions[0].base_host_virt_addr", "unsigned"),
    ("too-many-regions", b"[" + b",".join([REGION] * (MAX_REGIONS + 1)) + b"]", "payload",
     "regions"),
    ("trailing-garbage", b"[" + REGION + b"] junk", "payload", "JSON"),
    ("two-arrays", b"[" + REGION + b"][]", "payload", "JSON"),
    ("unclosed-string", b'["' + b"a" * 1000, "payload", "complete"),
    ("bracket-in-string-hides-end", b'["]"', "payload", "complete"),
    ("utf16-le", "[{}]".encode("utf-16-le"), "payload", "JSON"),
    ("utf16-brackets", b"[\x00" * 600, "payload", "depth"),
    ("bom", b"\xef\xbb\xbf[" + REGION + b"]", "payload", "array"),
    ("invalid-utf8", b'[{"a\xff": 1}]', "payload", "JSON"),
    ("nul-bytes", b"[\x00]", "payload", "JSON"),
    ("control-char-key", b'[{"\x1b[2J": 1}]', "payload", "JSON"),
    ("huge-string-value", b'[{"base_host_virt_addr": "' + b"A" * 1_000_000 + b'", "size": 1, '
     b'"offset": 0}]', "regions[0].base_host_virt_addr", "integer"),
    ("string-element", b'["' + b"x" * 100_000 + b'"]', "regions[0]", "object"),
    ("null-region", b"[null]", "regions[0]", "object"),
    ("true-size", b'[{"base_host_virt_addr": 0, "size": true, "offset": 0}]',
     "regions[0].size", "integer"),
    ("empty", b"", "payload", "complete"),
    ("whitespace-only", b" \n\t\r" * 1000, "payload", "complete"),
    ("object-not-array", b'{"a": 1}', "payload", "array"),
    ("over-4mib", b"[" + b" " * MAX_HANDSHAKE_BYTES + b"]", "payload", "larger"),
]


@pytest.mark.parametrize(("case", "payload", "field", "word"), CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_corpus_raises_handshake_error_naming_the_field(case: str, payload: bytes, field: str,
                                                        word: str) -> None:
    with pytest.raises(HandshakeError) as e:
        parse_regions(payload)
    assert e.value.field == field, (case, str(e.value))
    assert word in str(e.value), (case, str(e.value))
    # A peer controls the value: the message stays one bounded line.
    assert len(str(e.value)) < 500, (case, len(str(e.value)))
    assert "\n" not in str(e.value)


def test_deep_nesting_is_refused_while_it_arrives() -> None:
    """The scanner refuses the byte that opens depth MAX_DEPTH + 1, before the rest."""
    scanner = ArrayScanner()
    assert scanner.feed(b"[{") is None
    with pytest.raises(HandshakeError) as e:
        scanner.feed(b'"a": [')
    assert e.value.field == "payload" and f"depth {MAX_DEPTH + 1}" in str(e.value)


def test_one_byte_at_a_time_finds_the_end() -> None:
    payload = encode_regions([Region(0, 4096, 0), Region(1 << 30, 8192, 4096)])
    scanner = ArrayScanner()
    ends = [scanner.feed(payload[i:i + 1]) for i in range(len(payload))]
    assert ends[-1] == len(payload) and all(e is None for e in ends[:-1])


def _check(payload: bytes) -> None:
    """The oracle: regions (each a Region of unsigned ints) or HandshakeError."""
    try:
        got = parse_regions(payload)
    except HandshakeError as e:
        assert e.field and len(str(e)) < 500
        return
    assert got and all(isinstance(r, Region) for r in got)
    for r in got:
        for v in (r.base_address, r.size_bytes, r.offset, r.page_size):
            assert isinstance(v, int) and 0 <= v < 1 << 64


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_give_regions_or_handshake_error(payload: bytes) -> None:
    _check(payload)


# Bytes made of the tokens that matter to a JSON parser: far more likely than random bytes
# to reach deep nesting, long numbers, strings that hide brackets, and half-valid objects.
_TOKENS = st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b" ", b"0",
                           b"9" * 30, b"9" * 5000, b"-", b".", b"e", b"true", b"null", b"NaN",
                           b'"size"', b'"offset"', b'"base_host_virt_addr"', b'"page_size"',
                           b"4096", b"\xff", b"\x00", b"\xc3\xa9", b"[" * 50])


@settings(max_examples=400, deadline=None)
@given(st.lists(_TOKENS, max_size=200).map(b"".join))
def test_any_token_soup_gives_regions_or_handshake_error(payload: bytes) -> None:
    _check(b"[" + payload)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["size", "offset", "base_host_virt_addr", "page_size",
                         "page_size_kib", "x"]), inner, max_size=6),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(st.lists(_JSON, max_size=6))
def test_any_json_array_gives_regions_or_handshake_error(doc: list[object]) -> None:
    _check(json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(Region, st.integers(0, 1 << 40), st.integers(0, 1 << 40),
                          st.integers(0, 1 << 40)), min_size=1, max_size=8),
       st.data())
def test_a_mutated_valid_handshake_gives_regions_or_handshake_error(
        regions: list[Region], data: st.DataObject) -> None:
    payload = bytearray(encode_regions(regions, Generation.CURRENT))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    _check(bytes(payload))
