"""Decoding ``uffd_msg`` buffers: every event type, against a struct-packing oracle."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein._abi.mman import PM_PRESENT, PM_SWAP, PM_UFFD_WP
from pagein._abi.uffd import UFFD_MSG_SIZE, EventType, Feature, PagefaultFlag
from pagein.sys.pagemap import PageInfo
from pagein.sys.uffd import Fork, PageFault, Remap, Remove, Unmap, decode_events

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


def _pack(event: int, a: int, b: int, c: int, junk: bytes = bytes(7)) -> bytes:
    return struct.pack("<B7sQQQ", event, junk, a, b, c)


fault = st.tuples(st.just(EventType.PAGEFAULT), st.integers(0, 7), u64, u32)
ranges = st.tuples(st.sampled_from([EventType.REMOVE, EventType.UNMAP]), u64, u64,
                   st.just(0))
remap = st.tuples(st.just(EventType.REMAP), u64, u64, u64)


@given(st.lists(st.one_of(fault, ranges, remap), max_size=64), st.binary(min_size=7,
                                                                          max_size=7))
def test_decode_matches_the_packed_fields(msgs: list[tuple[int, int, int, int]],
                                          junk: bytes) -> None:
    data = b"".join(_pack(*m, junk=junk) for m in msgs)
    events = decode_events(data)
    assert len(events) == len(msgs)
    for (kind, a, b, c), ev in zip(msgs, events, strict=True):
        if kind == EventType.PAGEFAULT:
            assert ev == PageFault(b, bool(a & PagefaultFlag.WRITE), bool(a & PagefaultFlag.WP),
                                   bool(a & PagefaultFlag.MINOR), c)
        elif kind == EventType.REMOVE:
            assert ev == Remove(a, b)
        elif kind == EventType.UNMAP:
            assert ev == Unmap(a, b)
        else:
            assert ev == Remap(a, b, c)


def test_fork_adopts_the_new_fd_with_the_parent_features() -> None:
    r, w = os.pipe()
    os.close(w)
    (ev,) = decode_events(_pack(EventType.FORK, r | (0xDEAD << 32), 0, 0),
                          features=Feature.EVENT_FORK)
    assert isinstance(ev, Fork)
    assert ev.uffd.fileno() == r and ev.uffd.api.features == Feature.EVENT_FORK
    ev.uffd.close()
    with pytest.raises(OSError):
        os.fstat(r)


@given(st.binary(min_size=1, max_size=200).filter(lambda b: len(b) % UFFD_MSG_SIZE))
def test_torn_buffers_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a multiple of 32"):
        decode_events(data)


@given(st.integers(0, 255).filter(lambda k: k not in set(EventType)))
def test_unknown_event_types_are_refused_and_fork_fds_closed(kind: int) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ValueError, match=f"0x{kind:x}"):
        decode_events(_pack(EventType.FORK, r, 0, 0) + _pack(kind, 0, 0, 0))
    with pytest.raises(OSError):
        os.fstat(r)  # the fork fd decoded before the bad record was closed


@given(u64)
def test_pagemap_entry_decoding(entry: int) -> None:
    info = PageInfo.decode(entry)
    assert info.present == bool(entry & PM_PRESENT)
    assert info.swapped == bool(entry & PM_SWAP)
    assert info.uffd_wp == bool(entry & PM_UFFD_WP)
    assert info.pfn == ((entry & ((1 << 55) - 1)) if info.present else 0)
