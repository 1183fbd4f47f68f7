"""``pagein.sys.pipe``: vmsplice hands the pipe the page itself, not a copy."""

from __future__ import annotations

import os

import pytest

from pagein.errors import KernelError
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.pipe import pipe_capacity, set_pipe_capacity, vmsplice

pytestmark = pytest.mark.kernel


def test_the_pipe_reads_what_the_page_holds_when_read_not_when_spliced() -> None:
    r, w = os.pipe()
    try:
        with Mapping.anonymous(PAGE_SIZE) as m:
            m.write(0, b"before")
            assert vmsplice(w, m.address, PAGE_SIZE) == PAGE_SIZE
            m.write(0, b"after!")  # same physical page: the pipe sees it
            assert os.read(r, PAGE_SIZE).startswith(b"after!")
    finally:
        os.close(r)
        os.close(w)


def test_vmsplice_into_a_non_pipe_names_what_to_pass() -> None:
    with Mapping.anonymous(PAGE_SIZE) as m, open("/dev/null", "wb") as f, \
            pytest.raises(KernelError, match="write end of a pipe"):
        vmsplice(f.fileno(), m.address, PAGE_SIZE)


def test_pipe_capacity_grows() -> None:
    r, w = os.pipe()
    try:
        assert set_pipe_capacity(w, 1 << 20) >= 1 << 20
        assert pipe_capacity(w) >= 1 << 20
    finally:
        os.close(r)
        os.close(w)
