"""Strategies' plans and windows, and the stats renderings."""

from __future__ import annotations

import pytest

from pagein.serve.cause import Cause
from pagein.serve.firecracker import Region
from pagein.serve.stats import (
    LATENCY_BUCKETS_US,
    N_COUNTERS,
    CounterBlock,
    Counters,
    ServerSample,
    ServeStats,
    VmRow,
)
from pagein.serve.strategies import (
    OnDemand,
    PopulateAll,
    Readahead,
    Span,
    Then,
    WorkingSet,
    make_strategy,
)

HUGE = 2 << 20
REGIONS = [Region(0x10000000, 1 << 20, 0), Region(0x20000000, 2 * HUGE, 1 << 20, HUGE)]


def test_on_demand_does_nothing_extra() -> None:
    s = OnDemand()
    assert list(s.on_connect(REGIONS)) == []
    assert s.window_pages(REGIONS[0]) == 1


def test_readahead_window_in_pages_of_each_region() -> None:
    s = Readahead(64 * 1024)
    assert s.window_pages(REGIONS[0]) == 16
    assert s.window_pages(REGIONS[1]) == 1  # a hugepage is already bigger than the window
    assert Readahead(8 << 20).window_pages(REGIONS[1]) == 4
    with pytest.raises(ValueError, match="power of two"):
        Readahead(100_000)
    with pytest.raises(ValueError, match="smaller than one"):
        Readahead(2048)


def test_populate_all_plans_every_page_of_every_region() -> None:
    assert list(PopulateAll().on_connect(REGIONS)) == [Span(0, 0, 256), Span(1, 0, 2)]


def test_working_set_prefetches_recorded_extents_in_order() -> None:
    ws = WorkingSet([(0x3000, 0x2000), ((1 << 20) + HUGE, 10), (0xFF000, 0x2000)],
                    then=Then.POPULATE_ALL)
    plan = list(ws.on_connect(REGIONS))
    # Recorded extents first (clipped to regions, rounded out to pages), then the rest.
    p = Cause.PREFETCH
    assert plan[:4] == [Span(0, 3, 2, p), Span(1, 1, 1, p), Span(0, 255, 1, p), Span(1, 0, 1, p)]
    assert plan[4:] == [Span(0, 0, 256), Span(1, 0, 2)]
    assert make_strategy("working-set", working_set=[(0, 4096)]).name.value == "working-set"
    with pytest.raises(ValueError, match="working set"):
        make_strategy("working-set")


def test_reap_installs_the_recorded_set_before_serving_and_plans_nothing_after() -> None:
    reap = make_strategy("reap", working_set=[(0x3000, 0x2000)])
    assert reap.name.value == "reap"
    assert list(reap.blocking_plan(REGIONS)) == [Span(0, 3, 2, Cause.PREFETCH)]
    assert list(reap.on_connect(REGIONS)) == []
    assert reap.window_pages(REGIONS[0]) == 1  # the rest one page per fault
    ws = make_strategy("working-set", working_set=[(0x3000, 0x2000)])
    assert list(ws.blocking_plan(REGIONS)) == []
    assert ws.window_pages(REGIONS[0]) == 64  # readahead for the rest


def test_counters_add_snapshot_and_latency() -> None:
    a = Counters(faults=2, pages=3, bytes_fault=4096)
    a.observe_latency(3)
    a.observe_latency(LATENCY_BUCKETS_US[-1] + 1)
    b = a.snapshot()
    b.add(a)
    assert b.faults == 4 and b.bytes_copied == 8192
    assert b.latency_us_buckets[0] == 2 and b.latency_us_buckets[-1] == 2
    assert a.latency_us_buckets[0] == 1  # the snapshot is a copy
    d = b.to_dict()
    assert d["bytes_copied"] == 8192 and d["latency_us_le"][-1] == "inf"  # type: ignore[index]
    assert ServeStats.from_dict(d).faults == 4


def test_the_collector_renders_a_cumulative_histogram_in_seconds() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pagein.serve.metrics import ServerCollector
    c = Counters(faults=3, pages=7, bytes_readahead=8192)
    for us in (1, 30, 30):
        c.observe_latency(us)
    row = VmRow(4, 42, c, "active", "native", 0, 0.0, None)
    sample = ServerSample((row,), c, 0, 0.0, 1, {}, 0, 0, 0, 0, 1, "native")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(lambda: sample))
    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in text_string_to_metric_families(generate_latest(registry).decode())
           for x in f.samples}
    vm = (("pid", "42"), ("session", "4"))
    assert got[("pagein_sessions_active", ())] == 1
    assert got[("pagein_vm_installed_pages_total", vm)] == 7
    assert got[("pagein_vm_filled_bytes_total", (("cause", "readahead"), *vm))] == 8192
    assert got[("pagein_filled_bytes_total", (("cause", "readahead"),))] == 8192
    bucket = "pagein_vm_fault_latency_seconds_bucket"
    assert got[(bucket, (("le", "5e-06"), *vm))] == 1
    assert got[(bucket, (("le", "2e-05"), *vm))] == 1
    assert got[(bucket, (("le", "5e-05"), *vm))] == 3
    assert got[(bucket, (("le", "+Inf"), *vm))] == 3
    assert got[("pagein_vm_fault_latency_seconds_count", vm)] == 3
    assert got[("pagein_vm_fault_latency_seconds_sum", vm)] == pytest.approx(61e-6)
    assert got[("pagein_fault_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("pagein_sessions_ended_total", (("end", "peer exited"),))] == 0


@pytest.mark.parametrize("size", [256, 2048])
def test_readahead_smaller_than_a_page_is_refused_with_a_unit_hint(size: int) -> None:
    with pytest.raises(ValueError, match=r"smaller than one 4 KiB page: .*e\.g\. 256K"):
        Readahead(size)


def test_counter_block_words_are_the_native_core_indices() -> None:
    from pagein.serve import _core
    block = CounterBlock()
    block.add("faults", 2)
    block.add("remaps")
    block.observe_latency(7)
    assert block.words[_core.C_FAULTS] == 2 and block.words[_core.C_REMAPS] == 1
    assert block.words[_core.C_LATENCY_BUCKETS + 1] == 1
    assert block.words[_core.C_LATENCY_US_SUM] == 7
    assert _core.N_COUNTERS == N_COUNTERS
    snap = block.snapshot()
    assert snap.faults == 2 and snap.remaps == 1 and snap.latency_us_buckets[1] == 1


def test_engine_vocabularies_are_the_native_core_constants() -> None:
    from pagein.serve import _core
    from pagein.serve.engine import CoreEvent, Reason
    for r in Reason:
        assert getattr(_core, f"REASON_{r.name}") == r.value, r
    for c in Cause:
        assert getattr(_core, f"CAUSE_{c.name}") == c.value, c
    assert [e.value for e in CoreEvent] == [0x13, 0x14, 0x15, 0x16]  # UFFD_EVENT_*
    assert _core.RECORD_SIZE == 24
