"""Mappings and memfds on real memory: addresses, fixed placement, madvise, mincore."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pagein._abi.mman import Advice, Prot
from pagein.errors import MappingError
from pagein.sys.mapping import PAGE_SIZE, Mapping, Memfd

pytestmark = pytest.mark.kernel
P = PAGE_SIZE


def test_anonymous_private_mapping_reads_writes_and_views() -> None:
    with Mapping.anonymous(4 * P) as m:
        assert m.address % P == 0 and m.length == 4 * P and m.end == m.address + 4 * P
        assert m.read(0, 4 * P) == bytes(4 * P)
        m.write(P - 2, b"abcd")
        m.write(3 * P, bytearray(b"xy"))
        m.write(3 * P + 2, memoryview(b"zz"))
        v = m.view()
        assert bytes(v[P - 2: P + 2]) == b"abcd" and bytes(v[3 * P: 3 * P + 4]) == b"xyzz"
        v[0] = 7
        assert m.read(0, 1) == b"\x07"
        with pytest.raises(ValueError, match="outside the mapping"):
            m.read(4 * P - 1, 2)
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.read(0, 1)
    m.close()  # idempotent


def test_mapping_at_a_fixed_address_refuses_to_replace_unless_asked() -> None:
    with Mapping.anonymous(2 * P) as probe:
        addr = probe.address
        with pytest.raises(MappingError) as e:
            Mapping.anonymous(P, at=addr)  # MAP_FIXED_NOREPLACE: the range is taken
        assert e.value.errno == errno.EEXIST and f"0x{addr:x}" in str(e.value)
        probe.write(0, b"old")
        fixed = Mapping.anonymous(P, at=addr, replace=True)  # MAP_FIXED replaces it
        assert fixed.address == addr and fixed.read(0, 3) == bytes(3)
        fixed.release()  # ``probe`` unmaps the whole range
    with Mapping.anonymous(P, at=addr) as again:  # free now: NOREPLACE succeeds
        assert again.address == addr


def test_madvise_dontneed_zeroes_private_but_not_shared_memory() -> None:
    with Mapping.anonymous(2 * P) as priv, Mapping.anonymous(2 * P, shared=True) as shared:
        for m in (priv, shared):
            m.write(0, b"\xff" * 2 * P)
            m.madvise(Advice.DONTNEED, 0, P)
        assert priv.read(0, 2 * P) == bytes(P) + b"\xff" * P
        assert shared.read(0, 2 * P) == b"\xff" * 2 * P  # the shmem page cache keeps it
        shared.madvise(Advice.REMOVE, 0, P)  # punches the hole in shmem
        assert shared.read(0, P) == bytes(P)
        with pytest.raises(MappingError) as e:
            priv.madvise(Advice.DONTNEED, 1, P)
        assert e.value.errno == errno.EINVAL and "madvise(DONTNEED)" in str(e.value)


def test_mincore_counts_resident_pages() -> None:
    with Mapping.anonymous(8 * P) as m:
        assert m.resident_pages() == 0
        m.write(0, b"a")
        m.write(5 * P, b"b")
        vec = m.mincore()
        assert len(vec) == 8 and [b & 1 for b in vec] == [1, 0, 0, 0, 0, 1, 0, 0]
        m.madvise(Advice.DONTNEED)
        assert m.resident_pages() == 0


def test_memfd_maps_share_one_page_cache_across_processes() -> None:
    with Memfd.create("share", 4 * P) as mfd, mfd.map() as a, mfd.map() as b:
        assert a.address != b.address
        a.write(P, b"shared!")
        assert b.read(P, 7) == b"shared!"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child writes through its inherited mapping
            try:
                b.write(2 * P, b"child")
                os.write(w, b"k")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"k"
        os.close(r)
        os.waitpid(pid, 0)
        assert a.read(2 * P, 5) == b"child"
        with mfd.map(shared=False) as cow:  # MAP_PRIVATE: writes stay private
            cow.write(P, b"XX")
            assert cow.read(P, 7) == b"XXared!" and a.read(P, 7) == b"shared!"


def test_of_fd_maps_a_file_and_move_to_remaps_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"0123" * 2 * P)
    fd = os.open(path, os.O_RDONLY)
    try:
        with Mapping.of_fd(fd, 4 * P, offset=P, shared=False, prot=Prot.READ) as m:
            assert m.read(0, 4) == b"0123"
            with Mapping.anonymous(4 * P) as target:
                dest = target.release()
            m.move_to(dest)
            assert m.address == dest and m.read(4, 4) == b"0123"
            m.mprotect(Prot.READ | Prot.WRITE)
            m.write(0, b"w")  # private copy-on-write, the file is untouched
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read(4) == b"0123"


def test_bad_lengths_are_refused_before_the_kernel() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        Mapping.anonymous(P + 1)
    with pytest.raises(ValueError, match="multiple of"):
        Mapping.anonymous(P, hugetlb=True)
