"""Experiment 7 — what one page fault costs on this machine.

The same touch (one byte of every page) served five ways: the kernel allocating
anonymous memory, the kernel mapping the zero page, the kernel mapping page-cache
pages (warm, and cold from disk with readahead), and a userfaultfd round trip through
this project's Python handler, pinned to the toucher's CPU and to another CPU. These
are measurements, not claims: the numbers vary with the machine and its load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pagein._abi.libc import buffer_address
from pagein.lab._files import scratch_file, snapshot_bytes
from pagein.lab._probe import MIB, PAGE_SIZE, Recorder, Row, read_each_page, write_each_page
from pagein.lab._procs import CopyPolicy, FaultHandler
from pagein.sys.mapping import Mapping
from pagein.sys.uffd import RegisterMode, Userfaultfd

__all__ = ["FaultCost", "run"]


@dataclass(frozen=True, slots=True)
class FaultCost:
    """Nanoseconds per fault (and per page where one fault maps several)."""

    size_bytes: int
    pages: int
    toucher_cpu: int
    anon_write_ns_per_fault: int
    anon_read_zero_page_ns_per_fault: int
    file_warm_ns_per_fault: int
    file_warm_ns_per_page: int
    file_cold_ns_per_page: int
    file_cold_major_faults: int
    uffd_same_cpu_ns_per_fault: int
    uffd_copy_ns_per_fault: int  # of the same-CPU round trip: the UFFDIO_COPY call, wake included
    uffd_other_cpu_ns_per_fault: int  # 0 when only one CPU is allowed
    other_cpu: int  # -1 when only one CPU is allowed
    rows: tuple[Row, ...]


def _per(row: Row, count: int) -> int:
    return row.elapsed_ns // max(1, count)


def _faults(row: Row) -> int:
    return row.minor_faults + row.major_faults


@contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """Run the body on one CPU, then restore the affinity."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _kernel(rec: Recorder, size: int) -> tuple[int, int]:
    with Mapping.anonymous(size) as m:
        with rec.step("kernel anonymous: write fault", m.address, size):
            write_each_page(m.address, size, 1)
        rec.annotate(f"{_per(rec.last(), _faults(rec.last()))} ns/fault")
        write = _per(rec.last(), _faults(rec.last()))
    with Mapping.anonymous(size) as m:
        with rec.step("kernel anonymous: read fault (zero page)", m.address, size):
            read_each_page(m.address, size)
        read = _per(rec.last(), _faults(rec.last()))
        rec.annotate(f"{read} ns/fault")
    return write, read


def _file(rec: Recorder, size: int) -> tuple[int, int, int, int]:
    pages = size // PAGE_SIZE
    with scratch_file(snapshot_bytes(size)) as fd:
        os.pread(fd, size, 0)  # warm: every page in the page cache
        with Mapping.of_fd(fd, size, shared=True) as m, \
                rec.step("kernel file, warm page cache: read", m.address, size):
            read_each_page(m.address, size)
        warm = rec.last()
        rec.annotate(f"{_per(warm, _faults(warm))} ns/fault, {_per(warm, pages)} ns/page")
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        with Mapping.of_fd(fd, size, shared=True) as m, \
                rec.step("kernel file, cold (fadvise DONTNEED): read", m.address, size):
            read_each_page(m.address, size)
        cold = rec.last()
        rec.annotate(f"{_per(cold, _faults(cold))} ns/fault, {_per(cold, pages)} ns/page")
    return _per(warm, _faults(warm)), _per(warm, pages), _per(cold, pages), cold.major_faults


def _uffd(rec: Recorder, size: int, label: str, handler_cpu: int) -> tuple[int, int]:
    src = bytearray(size)  # alive until the handler has stopped
    with Mapping.anonymous(size) as m, Userfaultfd.open() as uffd:
        uffd.register(m.address, size, RegisterMode.MISSING)
        policy = CopyPolicy(m.address, buffer_address(src))
        with FaultHandler(uffd, policy, (m.address, size), cpu=handler_cpu) as handler:
            with rec.step(label, m.address, size):
                read_each_page(m.address, size)
            stats = handler.stop()
        uffd.unregister(m.address, size)
    per = _per(rec.last(), stats.faults)
    fill = stats.fill_ns // max(1, stats.faults)
    rec.annotate(f"{per} ns/fault ({stats.faults} faults, {fill} ns in the UFFDIO_COPY call)")
    return per, fill


def run(size_bytes: int = 64 * MIB) -> FaultCost:
    """Touch ``size_bytes`` five ways, pinned to one CPU, and time each fault."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0]
    other = cpus[1] if len(cpus) > 1 else -1
    rec = Recorder()
    with _pinned(cpu):
        anon_w, anon_r = _kernel(rec, size_bytes)
        warm_f, warm_p, cold_p, cold_major = _file(rec, size_bytes)
        same, copy_ns = _uffd(rec, size_bytes, f"uffd round trip, handler on CPU {cpu} (same)",
                              cpu)
        diff = 0
        if other >= 0:
            diff, _ = _uffd(rec, size_bytes, f"uffd round trip, handler on CPU {other} (other)",
                         other)
    return FaultCost(
        size_bytes=size_bytes, pages=size_bytes // PAGE_SIZE, toucher_cpu=cpu,
        anon_write_ns_per_fault=anon_w, anon_read_zero_page_ns_per_fault=anon_r,
        file_warm_ns_per_fault=warm_f, file_warm_ns_per_page=warm_p,
        file_cold_ns_per_page=cold_p, file_cold_major_faults=cold_major,
        uffd_same_cpu_ns_per_fault=same, uffd_copy_ns_per_fault=copy_ns,
        uffd_other_cpu_ns_per_fault=diff, other_cpu=other,
        rows=rec.rows())
