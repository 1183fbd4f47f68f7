"""The VMM's pure parts: guest ABI in sync with the C header, layout tables, arguments."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein.vmm import abi, layout
from pagein.vmm.console import Console
from pagein.vmm.image import GUEST_SRC
from pagein.vmm.workloads import (
    Op,
    Pattern,
    function_args,
    function_table_capacity,
    parse_size,
    parse_workload,
)

MiB = 1 << 20


def _header_defines() -> dict[str, int]:
    text = (GUEST_SRC / "pagein_guest.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"#define (PG_\w+)\s+\(?(-?\w+)\)?", text)}


def test_c_header_agrees_with_python_abi() -> None:
    defs = _header_defines()
    for port in abi.Port:
        assert defs[f"PG_PORT_{port.name}"] == port, port.name
    assert defs["PG_PARAMS_ADDR"] == abi.PARAMS_ADDR
    assert defs["PG_MAGIC"] == abi.MAGIC
    assert defs["PG_MAX_ARGS"] == abi.MAX_ARGS
    assert defs["PG_RETRY"] == abi.RETRY


def test_params_page_layout() -> None:
    raw = abi.Params(mem_size=64 * MiB, vcpus=4, heap_start=16 * MiB, heap_end=64 * MiB,
                     args=(5, -1)).pack()
    assert len(raw) == 8 * 8 + abi.MAX_ARGS * 8
    words = struct.unpack(f"<{len(raw) // 8}Q", raw)
    assert raw[:8] == b"PAGEINVM"
    assert words[2:7] == (64 * MiB, 4, 16 * MiB, 64 * MiB, 2)
    assert words[8:11] == (5, 2**64 - 1, 0)
    with pytest.raises(ValueError, match="at most 24"):
        abi.Params(1, 1, 1, 1, args=tuple(range(25))).pack()


def test_page_tables_map_all_ram_with_user_large_pages() -> None:
    mem = 2 * layout.GiB + 64 * MiB
    pieces = dict(layout.system_tables(mem))
    pdpt = struct.unpack("<3Q", pieces[layout.PDPT_ADDR])
    assert [e & ~0xFFF for e in pdpt] == [layout.PD_ADDR + i * 0x1000 for i in range(3)]
    pd = struct.unpack(f"<{mem // layout.LARGE_PAGE}Q", pieces[layout.PD_ADDR])
    assert pd[0] & 0x7 == 0x3          # system page: present, writable, supervisor
    assert pd[1] & 0x7 == 0x5          # parameter page: present, read-only, user
    assert all(e & 0x87 == 0x87 for e in pd[2:])
    assert [e & ~0xFFF for e in pd] == [i * layout.LARGE_PAGE for i in range(len(pd))]


def test_gdt_tss_descriptor_points_at_tss_with_io_bitmap() -> None:
    pieces = dict(layout.system_tables(32 * MiB))
    gdt = struct.unpack("<7Q", pieces[layout.GDT_ADDR])
    low = gdt[layout.TSS_SEL // 8]
    base = ((low >> 16) & 0xFFFFFF) | (((low >> 56) & 0xFF) << 24)
    assert base == layout.TSS_ADDR and low & 0xFFFF == layout.TSS_LIMIT
    assert (gdt[layout.USER_CS // 8] >> 45) & 3 == 3  # DPL 3
    tss = pieces[layout.TSS_ADDR]
    assert struct.unpack_from("<H", tss, 102)[0] == layout.TSS_BYTES
    assert tss[layout.TSS_BYTES:-1] == bytes(8192) and tss[-1] == 0xFF
    assert layout.TSS_ADDR + len(tss) <= layout.PD_ADDR


@pytest.mark.parametrize("size", [0, 16 * MiB, 33 * MiB, 65 * layout.GiB])
def test_memory_size_limits_are_named(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 2 MiB between 18 MiB and 64 GiB"):
        layout.check_memory_size(size)


@given(st.integers(0, 1 << 40), st.sampled_from(["", "k", "M", "G", "KiB", "MB"]))
def test_parse_size(n: int, unit: str) -> None:
    factor = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30, "KiB": 1 << 10, "MB": 1 << 20}
    assert parse_size(f"{n}{unit}") == n * factor[unit]


def test_workload_arguments() -> None:
    f = parse_workload("function", ["state=1M", "seed=0x10"])
    assert f.args == (MiB, 16)
    records = MiB // 64
    assert f.min_heap_bytes == MiB + function_table_capacity(records) * 4
    assert function_table_capacity(3) == 8 and function_table_capacity(4) == 8
    s = parse_workload("scan", ["pattern=hotset", "op=write", "size=8M", "hot=5"])
    assert s.args == (Pattern.HOTSET, Op.WRITE, 8 * MiB, 0, 16, 5, 1)
    assert function_args(640).args == (640, 1)


@pytest.mark.parametrize(("name", "items", "message"), [
    ("function", ["sate=1M"], "has no argument 'sate'"),
    ("function", ["state"], "must look like key=value"),
    ("scan", ["pattern=zigzag"], "pattern='zigzag' must be one of"),
    ("scan", ["op=erase"], "op='erase' must be read or write"),
    ("scan", ["size=1000"], "multiple of 4096"),
    ("nope", [], "unknown workload 'nope'"),
    ("function", ["state=12x"], "size '12x' is not a number"),
])
def test_bad_workload_arguments_name_the_item(name: str, items: list[str],
                                               message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_workload(name, items)


def test_console_hands_out_lines_and_keeps_pending_input() -> None:
    console = Console()
    console.send("get 1\nsum")
    assert console.take_line(100, lambda: False) == b"get 1\n"
    assert console.pending_input() == b"sum"
    console.send(" 1 2\nchecksum\n")
    assert console.take_line(3, lambda: False) == b"sum"  # capacity splits a long line
    assert console.take_line(100, lambda: False) == b" 1 2\n"
    assert console.pending_input() == b"checksum\n"
    assert console.take_line(100, lambda: True) is None  # a pause or stop cuts waits short
    console.close_input()
    assert console.take_line(100, lambda: False) == b"checksum\n"
    assert console.take_line(100, lambda: False) == b""  # end of input
    console.write(b"ok\npart")
    assert console.read_line(timeout=1) == "ok"
    with pytest.raises(TimeoutError, match="partial output b'part'"):
        console.read_line(timeout=0.01)
