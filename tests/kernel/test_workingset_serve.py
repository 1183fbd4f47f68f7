"""Record a restore's working set with ``pagein serve --record``, prefetch it with
``--strategy working-set``/``reap``: real userfaultfd, the Firecracker-faithful client as
the guest, every byte checked."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagein.serve.cause import Cause
from pagein.serve.record import load_trace
from pagein.snapshot import workingset
from pagein.snapshot.raw import RawFileSource
from serve_harness import PAGE, client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 4 << 20
REGIONS = [(0x10000, 1 << 20), (0x180000, 2 << 20)]


def _restore(tmp: Path, mem: str, *serve_args: str, touch: tuple[str, ...] = ()) -> dict[
        str, object]:
    """Serve one client restore; return the server's total counters (client must pass)."""
    tmp.mkdir(exist_ok=True)
    server = start_server(str(tmp), mem, "--exit-after", "1", *serve_args)
    try:
        rc, res = finish(client(*touch_args(server, mem, REGIONS, "--threads", "2", *touch)))
        assert rc == 0 and res["ok"], res
        server.proc.wait(30)
        total = server.stats()["total"]
        assert isinstance(total, dict)
        return total
    finally:
        server.stop()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, bytes,
                                                                         dict[str, object]]]:
    d = tmp_path_factory.mktemp("ws")
    mem = str(d / "mem.snap")
    data = make_snapshot(mem, SIZE)
    stats = _restore(d / "rec", mem, "--record", str(d / "ws"))
    yield d, mem, data, stats
    shutil.rmtree(d, ignore_errors=True)


def _flat(runs: list[tuple[int, int]]) -> list[int]:
    return [o + i * PAGE for o, n in runs for i in range(n)]


def test_recorded_pages_are_the_snapshot_bytes_in_first_touch_order(
        recorded: tuple[Path, str, bytes, dict[str, object]]) -> None:
    d, mem, data, stats = recorded
    trace = load_trace(str(d / "ws") + ".trace.json")
    assert len(trace.faults) == stats["faults"]
    assert {f.cause for f in trace.fills} <= {Cause.DEMAND, Cause.ZERO}
    first: list[int] = []
    for f in trace.faults:
        if f.offset not in first:
            first.append(f.offset)
    with RawFileSource(mem) as src, workingset.load(str(d / "ws"), src) as ws:
        pages = [r.offset + i * PAGE for r in ws.runs for i in range(r.pages)]
        # Every touched page once, in first-touch order of the (stream-merged) runs.
        assert pages == _flat(workingset.merge_runs(first))
        assert sorted(pages) == sorted(first)
        assert len(pages) == sum(size for _, size in REGIONS) // PAGE
        for r in ws.runs:
            for i in range(r.pages):
                off = r.offset + i * PAGE
                if r.kind is workingset.RunKind.DATA:
                    assert ws.page_bytes(r, i) == data[off:off + PAGE]
                else:
                    assert not any(data[off:off + PAGE])
        assert ws.zero_pages == sum(1 for p in pages if not any(data[p:p + PAGE]))
        # Data stored contiguously after the header and the runs table, zero pages left out.
        head = -(-(80 + 16 * len(ws.runs)) // PAGE) * PAGE
        assert os.path.getsize(d / "ws") == head + ws.data_pages * PAGE


@pytest.mark.parametrize("strategy", ["working-set", "reap"])
def test_prefetch_restores_every_byte_with_fewer_faults(
        recorded: tuple[Path, str, bytes, dict[str, object]], strategy: str) -> None:
    d, mem, _, on_demand = recorded
    trace = str(d / f"{strategy}.trace.json")
    then = ["--then", "on-demand"] if strategy == "working-set" else []  # reap: refused
    stats = _restore(d / strategy, mem, "--strategy", strategy, "--working-set", str(d / "ws"),
                     *then, "--trace", trace)
    faults = stats["faults"]
    assert isinstance(faults, int) and isinstance(on_demand["faults"], int)
    assert faults * 4 < on_demand["faults"], (faults, on_demand["faults"])
    arrivals = {f.cause for f in load_trace(trace).fills}
    assert Cause.PREFETCH in arrivals


def test_balloon_during_prefetch_still_reads_zeros(
        recorded: tuple[Path, str, bytes, dict[str, object]]) -> None:
    d, mem, _, _ = recorded
    stats = _restore(d / "balloon", mem, "--strategy", "working-set", "--working-set",
                     str(d / "ws"), touch=("--balloon-rounds", "4"))
    assert isinstance(stats["removes"], int) and stats["removes"] >= 4


def test_pre_balloon_untouched_range_reads_zeros_with_working_set(
        recorded: tuple[Path, str, bytes, dict[str, object]]) -> None:
    d, mem, _, _ = recorded
    _restore(d / "preballoon", mem, "--strategy", "reap", "--working-set", str(d / "ws"),
             touch=("--pre-balloon", "0x40000:0x40000"))


def _refused(tmp: Path, mem: str, ws: str) -> str:
    tmp.mkdir(exist_ok=True)
    with pytest.raises(RuntimeError) as e:
        server = start_server(str(tmp), mem, "--strategy", "working-set", "--working-set", ws)
        server.stop()
    assert not os.path.exists(tmp / "fc.sock")  # refused before listening
    return str(e.value)


def test_damaged_or_foreign_working_set_is_refused_before_serving(
        recorded: tuple[Path, str, bytes, dict[str, object]], tmp_path: Path) -> None:
    d, mem, _, _ = recorded
    good = (d / "ws").read_bytes()
    bad = tmp_path / "bad.ws"
    bad.write_bytes(good[:-100])
    assert "is truncated" in _refused(tmp_path / "a", mem, str(bad))
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    assert "is corrupted" in _refused(tmp_path / "b", mem, str(bad))
    bad.write_bytes(b"not a working set" * 10)
    assert "not a pagein working-set file" in _refused(tmp_path / "c", mem, str(bad))
    other = str(tmp_path / "other.snap")
    make_snapshot(other, SIZE, seed=99)
    assert "does not belong to" in _refused(tmp_path / "d", other, str(d / "ws"))
    make_snapshot(other, SIZE * 2)
    assert "recorded from a 4194304-byte memory file" in _refused(tmp_path / "e", other,
                                                                   str(d / "ws"))
