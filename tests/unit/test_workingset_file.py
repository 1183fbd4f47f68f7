"""The working-set file: run merging, layout, and every refusal naming what is wrong."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagein.errors import IntegrityError, SnapshotFormatError
from pagein.serve.record import OutputNames, Recorder, load_trace
from pagein.snapshot import workingset
from pagein.snapshot.source import PageSource
from pagein.snapshot.workingset import MAGIC, RunKind, merge_runs

PAGE = 4096


class BytesSource(PageSource):
    """A snapshot held in memory (pages that are all zeros count as holes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


def _snapshot(pages: int, zero: set[int], seed: int = 1) -> bytes:
    out = bytearray()
    for i in range(pages):
        out += bytes(PAGE) if i in zero else bytes([(i * 7 + seed) % 251 + 1]) * PAGE
    return bytes(out)


@given(st.lists(st.integers(0, 40), max_size=200))
def test_merge_runs_keeps_first_touch_order_and_every_page_once(pages: list[int]) -> None:
    runs = merge_runs(p * PAGE for p in pages)
    _check_runs(runs, pages)


def _check_runs(runs: list[tuple[int, int]], pages: list[int]) -> None:
    """The oracle: every first-touched page once; runs ordered by their first touch;
    within a run each page was first touched after the page before it."""
    first = {p: i for i, p in reversed(list(enumerate(pages)))}
    flat = [o // PAGE + i for o, n in runs for i in range(n)]
    assert sorted(flat) == sorted(first) and len(flat) == len(first)
    starts = [first[o // PAGE] for o, _ in runs]
    assert starts == sorted(starts)
    for o, n in runs:
        assert all(first[o // PAGE + i] < first[o // PAGE + i + 1] for i in range(n - 1))


def test_merge_runs_turns_interleaved_streams_into_one_run_each() -> None:
    a = [16 + i for i in range(100)]
    b = [500 + i for i in range(100)]
    pages = [p for pair in zip(a, b, strict=True) for p in pair]
    assert merge_runs(p * PAGE for p in pages) == [(16 * PAGE, 100), (500 * PAGE, 100)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 31), min_size=1, max_size=60), st.sets(st.integers(0, 31)))
def test_write_then_load_gives_the_snapshot_bytes_in_touch_order(
        tmp_path_factory: pytest.TempPathFactory, touched: list[int], zero: set[int]) -> None:
    src = BytesSource(_snapshot(32, zero))
    path = str(tmp_path_factory.mktemp("ws") / "ws")
    workingset.write(path, src, [p * PAGE for p in touched])
    with workingset.load(path, src) as ws:
        flat = [r.offset // PAGE + i for r in ws.runs for i in range(r.pages)]
        merged = merge_runs(p * PAGE for p in touched)
        assert flat == [o // PAGE + i for o, n in merged for i in range(n)]
        for r in ws.runs:
            assert (r.kind is RunKind.ZERO) == (r.offset // PAGE in zero)
            for i in range(r.pages if r.kind is RunKind.DATA else 0):
                off = r.offset + i * PAGE
                assert ws.page_bytes(r, i) == src.data[off:off + PAGE]
        assert ws.data_pages == len({p for p in touched if p not in zero})


def _good(tmp_path: Path) -> tuple[str, BytesSource, bytes]:
    src = BytesSource(_snapshot(16, {3}))
    path = str(tmp_path / "ws")
    workingset.write(path, src, [PAGE * p for p in (5, 6, 3, 1, 9)])
    return path, src, Path(path).read_bytes()


def test_header_layout(tmp_path: Path) -> None:
    path, src, raw = _good(tmp_path)
    magic, version, page, mem, nruns, flags, data_off, data_pages = struct.unpack_from(
        "<8sIIQIIQQ", raw)
    assert (magic, version, page, mem, flags, data_off) == (MAGIC, 1, PAGE, 16 * PAGE, 0, PAGE)
    assert nruns == 4 and data_pages == 4  # (5,6) 3(zero) 1 9
    assert struct.unpack_from("<QII", raw, 80) == (5 * PAGE, 2, 0)
    assert struct.unpack_from("<QII", raw, 96) == (3 * PAGE, 1, 1)
    assert raw[PAGE:2 * PAGE] == src.data[5 * PAGE:6 * PAGE]  # data starts at the first run
    assert workingset.load_extents(path) == [(5 * PAGE, 2 * PAGE), (3 * PAGE, PAGE),
                                             (PAGE, PAGE), (9 * PAGE, PAGE)]


@pytest.mark.parametrize(("edit", "error", "text"), [
    (lambda b: b[:40], SnapshotFormatError, "is truncated: 40 bytes"),
    (lambda b: b[:-1], SnapshotFormatError, "is truncated or has trailing bytes"),
    (lambda b: b + b"x", SnapshotFormatError, "is truncated or has trailing bytes"),
    (lambda b: b"XXXXXXXX" + b[8:], SnapshotFormatError, "bad magic"),
    (lambda b: b[:8] + struct.pack("<I", 9) + b[12:], SnapshotFormatError, "format version 9"),
    (lambda b: b[:12] + struct.pack("<I", 8192) + b[16:], SnapshotFormatError,
     "field page_size/flags"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), IntegrityError, "is corrupted"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], IntegrityError, "is corrupted"),
])
def test_damaged_files_are_refused_naming_the_problem(
        tmp_path: Path, edit: object, error: type[Exception], text: str) -> None:
    path, src, raw = _good(tmp_path)
    Path(path).write_bytes(edit(raw))  # type: ignore[operator]
    with pytest.raises(error, match=text):
        workingset.load(path, src)


@pytest.mark.parametrize("run", [(15 * PAGE, 2, 0), (5 * PAGE, 2, 7), (5 * PAGE + 1, 2, 0)])
def test_a_bad_run_with_a_matching_checksum_is_refused_naming_the_field(
        tmp_path: Path, run: tuple[int, int, int]) -> None:
    path, src, raw = _good(tmp_path)
    body = raw[:80] + struct.pack("<QII", *run) + raw[96:]
    digest = hashlib.sha256(body[80:]).digest()
    Path(path).write_bytes(body[:48] + digest + body[80:])
    with pytest.raises(SnapshotFormatError, match=r"field runs\[0\]"):
        workingset.load(path, src)


def test_a_working_set_of_another_snapshot_is_refused(tmp_path: Path) -> None:
    path, _, _ = _good(tmp_path)
    with pytest.raises(IntegrityError, match=r"does not belong to .* offset 0x5000"):
        workingset.load(path, BytesSource(_snapshot(16, {3}, seed=2)))
    with pytest.raises(IntegrityError, match="recorded from a 65536-byte memory file"):
        workingset.load(path, BytesSource(_snapshot(32, {3})))


def test_overlay_source_reads_recorded_pages_from_the_working_set(tmp_path: Path) -> None:
    path, src, _ = _good(tmp_path)
    with workingset.load(path, src) as ws:
        overlay = workingset.WorkingSetSource(src, ws)
        for p in range(16):
            buf = bytearray(PAGE)
            overlay.read_into(p * PAGE, memoryview(buf))
            assert buf == src.data[p * PAGE:(p + 1) * PAGE]
        assert ws.data_address(5 * PAGE, 2 * PAGE) is not None
        assert ws.data_address(5 * PAGE, 3 * PAGE) is None  # past the run
        assert ws.data_address(2 * PAGE, PAGE) is None  # not recorded


def test_recorder_writes_a_trace_and_the_working_set(tmp_path: Path) -> None:
    src = BytesSource(_snapshot(8, {2}))
    rec = Recorder(trace_path=str(tmp_path / "t.json"), working_set_path=str(tmp_path / "w"))
    for off in (4 * PAGE, 2 * PAGE, 4 * PAGE, 5 * PAGE):
        rec.fault(off, 77, off == 2 * PAGE)
    assert rec.finish(src, []) == []
    t = load_trace(str(tmp_path / "t.json"))
    assert [(f.offset, f.thread_id, f.zero) for f in t.faults] == [
        (4 * PAGE, 77, False), (2 * PAGE, 77, True), (4 * PAGE, 77, False),
        (5 * PAGE, 77, False)]
    # Page 5 continues the run that page 4 started, so it is stored with it.
    assert workingset.load_extents(str(tmp_path / "w")) == [(4 * PAGE, 2 * PAGE),
                                                            (2 * PAGE, PAGE)]


def test_several_vms_recorded_by_one_server_never_overwrite_each_other(tmp_path: Path) -> None:
    src = BytesSource(_snapshot(8, set()))
    names = OutputNames()
    paths = {"trace_path": str(tmp_path / "t.json"), "working_set_path": str(tmp_path / "w")}
    recs = [Recorder(**paths, names=names) for _ in range(3)]
    for i, rec in enumerate(recs):
        rec.fault(i * PAGE, 1, False)
    for rec in recs:
        assert rec.finish(src, []) == []
    # The first VM to go writes the paths given; later ones .2, .3.
    assert workingset.load_extents(str(tmp_path / "w")) == [(0, PAGE)]
    assert workingset.load_extents(str(tmp_path / "w.2")) == [(PAGE, PAGE)]
    assert workingset.load_extents(str(tmp_path / "w.3")) == [(2 * PAGE, PAGE)]
    assert [f.offset for f in load_trace(str(tmp_path / "t.json.3")).faults] == [2 * PAGE]


def test_an_unwritable_trace_costs_only_the_trace(tmp_path: Path) -> None:
    """Issue 13, finding 8: a trace that could not be written used to raise before the
    working set was written, and left its temporary file behind."""
    src = BytesSource(_snapshot(8, set()))
    (tmp_path / "f").write_text("")
    rec = Recorder(trace_path=str(tmp_path / "f" / "t.json"), working_set_path=str(tmp_path / "w"))
    rec.fault(3 * PAGE, 1, False)
    errors = rec.finish(src, [])
    assert [str(e) for e in errors] == [f"cannot write the trace {tmp_path}/f/t.json: "
                                        "Not a directory"]
    assert workingset.load_extents(str(tmp_path / "w")) == [(3 * PAGE, PAGE)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "w"]


def test_a_fault_in_a_huge_page_region_records_the_whole_aligned_page(tmp_path: Path) -> None:
    """A 2 MiB hugetlb page is faulted and filled whole, so the working set holds it whole:
    a fault anywhere in it records the aligned 2 MiB page (once), it is data if any of it
    is, zeros only if all of it is; and the prefetch plan of that file is one span per
    huge page."""
    from pagein.serve.cause import Cause
    from pagein.serve.firecracker import Region
    from pagein.serve.strategies import Span, WorkingSet

    huge = 2 << 20
    data = bytearray(3 * huge)  # a 4 KiB region, then two huge pages
    data[5 * PAGE:6 * PAGE] = b"\x05" * PAGE
    data[huge + (1 << 20):2 * huge] = b"\x07" * (1 << 20)  # second half of huge page 0
    src = BytesSource(bytes(data))                          # huge page 1: all zeros
    regions = [Region(0x10000000, huge, 0), Region(0x20000000, 2 * huge, huge, huge)]
    rec = Recorder(working_set_path=str(tmp_path / "ws"))
    for off in (huge + 300 * PAGE, 5 * PAGE, 2 * huge + 7 * PAGE, huge + 3 * PAGE):
        rec.fault(off, 0, False)
    assert rec.finish(src, regions) == []
    with workingset.load(str(tmp_path / "ws"), src) as ws:
        # (huge page 1 continues huge page 0's run: runs merge as for 4 KiB pages)
        assert [(r.offset, r.pages, r.kind) for r in ws.runs] == [
            (huge, 512, RunKind.DATA), (2 * huge, 512, RunKind.ZERO),
            (5 * PAGE, 1, RunKind.DATA)]
        assert all(ws.page_bytes(ws.runs[0], i) == data[huge + i * PAGE:huge + (i + 1) * PAGE]
                   for i in (0, 255, 256, 511))
        plan = list(WorkingSet(ws.extents()).on_connect(regions))
    p = Cause.PREFETCH
    assert plan == [Span(1, 0, 1, p), Span(1, 1, 1, p), Span(0, 5, 1, p)]
