"""RawFileSource: zero-copy addresses, holes from SEEK_DATA/SEEK_HOLE, clear errors."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from pagein.errors import SnapshotFormatError, SourceError
from pagein.snapshot.open import open_source
from pagein.snapshot.raw import RawFileSource

pytestmark = pytest.mark.kernel

P = 4096


def _sparse(path: Path, data_pages: list[int], pages: int) -> bytes:
    content = bytearray(pages * P)
    with open(path, "wb") as f:
        f.truncate(pages * P)
        for i in data_pages:
            block = bytes([i % 251 + 1]) * P
            content[i * P:(i + 1) * P] = block
            f.seek(i * P)
            f.write(block)
    return bytes(content)


def test_holes_are_reported_and_data_is_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    data = _sparse(path, [0, 1, 5, 9, 10, 11, 63], 64)
    with open_source(str(path)) as src:
        assert isinstance(src, RawFileSource) and src.size == 64 * P
        assert src.zero_extents(0, 64 * P) == [(2 * P, 3 * P), (6 * P, 3 * P), (12 * P, 51 * P)]
        assert src.zero_extents(P, 2 * P) == [(2 * P, P)]
        assert src.zero_extents(9 * P, 3 * P) == []
        addr = src.address_of(9 * P, 3 * P)
        assert addr is not None
        assert ctypes.string_at(addr, 3 * P) == data[9 * P:12 * P]
        buf = bytearray(5 * P)
        src.read_into(8 * P, memoryview(buf))
        assert bytes(buf) == data[8 * P:13 * P]
        with pytest.raises(SourceError, match="outside snapshot memory file"):
            src.read_into(63 * P, memoryview(bytearray(2 * P)))


def test_every_hole_is_zero_and_every_extent_reported(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    pages = [i for i in range(200) if (i * 7) % 5 == 0]
    data = _sparse(path, pages, 200)
    with RawFileSource(path) as src:
        holes = src.zero_extents(0, 200 * P)
        for off, n in holes:
            assert not any(data[off:off + n])
        hole_pages = {p for off, n in holes for p in range(off // P, (off + n) // P)}
        assert hole_pages == set(range(200)) - set(pages)


@pytest.mark.parametrize(("make", "error", "words"), [
    (lambda p: None, SourceError, "does not exist"),
    (lambda p: p.mkdir(), SourceError, "is a directory"),
    (lambda p: p.write_bytes(b""), SnapshotFormatError, "is empty"),
])
def test_clear_errors(tmp_path: Path, make: object, error: type[Exception], words: str) -> None:
    path = tmp_path / "mem.snap"
    make(path)  # type: ignore[operator]
    with pytest.raises(error) as e:
        RawFileSource(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_close_is_idempotent_and_fd_released(tmp_path: Path) -> None:
    path = tmp_path / "mem.snap"
    _sparse(path, [0], 4)
    before = len(os.listdir("/proc/self/fd"))
    src = RawFileSource(path)
    src.close()
    src.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(SourceError, match="closed"):
        src.read_into(0, memoryview(bytearray(P)))
