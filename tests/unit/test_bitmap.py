"""Bitmap range operations against a set-of-ints oracle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein.serve.bitmap import Bitmap

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 80)), max_size=30)


@given(st.integers(0, 300), ops, st.integers(0, 320))
def test_matches_set_oracle(size: int, operations: list[tuple[bool, int, int]], probe: int) -> None:
    bm = Bitmap(size)
    oracle: set[int] = set()
    for is_set, start, n in operations:
        start = min(start, size)
        n = min(n, size - start)
        before = len(oracle & set(range(start, start + n)))
        if is_set:
            assert bm.set(start, n) == n - before
            oracle |= set(range(start, start + n))
        else:
            assert bm.clear(start, n) == before
            oracle -= set(range(start, start + n))
        assert bm.count == len(oracle)
    assert [bm.test(i) for i in range(size)] == [i in oracle for i in range(size)]
    assert bm.next_set(probe) == min([i for i in oracle if i >= probe], default=size)
    assert bm.next_clear(probe) == min([i for i in range(probe, size) if i not in oracle],
                                       default=size)
    lo = min(probe, size)
    runs = bm.clear_runs(lo, size)
    covered = {p for first, n in runs for p in range(first, first + n)}
    assert covered == set(range(lo, size)) - oracle
    assert all(first + n == size or bm.test(first + n) for first, n in runs)
    assert bm.full() == (len(oracle) == size)
    assert bm.count_range(lo, size - lo) == len([i for i in oracle if i >= lo])


def test_out_of_range_is_an_error() -> None:
    bm = Bitmap(10)
    with pytest.raises(IndexError):
        bm.set(5, 6)
    with pytest.raises(IndexError):
        bm.test(10)
    with pytest.raises(ValueError):
        Bitmap(-1)


def test_large_bitmap_searches_skip_whole_bytes() -> None:
    bm = Bitmap(262144)  # 1 GiB of 4 KiB pages
    bm.set(0, 262143)
    assert bm.next_clear(0) == 262143
    assert bm.clear_runs(0, 262144) == [(262143, 1)]
    bm.set(262143)
    assert bm.full() and bm.next_clear(0) == 262144
