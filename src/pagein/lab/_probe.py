"""What the kernel did, measured: fault counters, RSS, pagemap, smaps, and page touches.

Every experiment records its steps with a :class:`Recorder`: a step reads the fault
counters of the process doing the touching (``/proc/PID/stat``), times the body, then
reads that process's RSS and the pagemap of the range it touched. The result is a
:class:`Row` per step, which the CLI prints as a table.

Safety: the touch helpers read and write raw memory at the addresses given. Touching a
uffd-registered range from the process that serves it deadlocks (docs/serve.md, "Library use"): the
experiments serve faults from a forked handler process.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from time import perf_counter_ns

from pagein._abi import libc
from pagein.sys.mapping import PAGE_SIZE
from pagein.sys.pagemap import Pagemap

__all__ = [
    "MIB",
    "PAGE_SIZE",
    "Counters",
    "Recorder",
    "Row",
    "Step",
    "data_crcs",
    "fault_counters",
    "is_zero_page",
    "page_crcs",
    "page_pfns",
    "read_each_page",
    "rss_kib",
    "vma_flags",
    "vma_kib",
    "write_each_page",
]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Counters:
    """A process's page-fault counters: minor (no I/O) and major (waited for I/O)."""

    minor: int
    major: int


def _proc(pid: int | None) -> str:
    return f"/proc/{pid or 'self'}"


def fault_counters(pid: int | None = None) -> Counters:
    """Read ``minflt`` and ``majflt`` of a process from ``/proc/PID/stat``."""
    with open(f"{_proc(pid)}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = data[data.rindex(b")") + 2:].split()
    return Counters(minor=int(fields[7]), major=int(fields[9]))


def rss_kib(pid: int | None = None) -> int:
    """Return the resident set size of a process in KiB (``/proc/PID/statm``)."""
    with open(f"{_proc(pid)}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE // 1024


def vma_kib(address: int, pid: int | None = None) -> dict[str, int]:
    """Return the ``smaps`` sizes (KiB) of the mapping that contains ``address``.

    Keys as the kernel spells them: ``Rss``, ``Private_Dirty``, ``AnonHugePages``...
    Returns ``{}`` when no mapping contains the address.
    """
    out: dict[str, int] = {}
    inside = False
    with open(f"{_proc(pid)}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.rstrip().endswith(" kB"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def vma_flags(address: int, pid: int | None = None) -> frozenset[str]:
    """Return the ``VmFlags`` of the mapping that contains ``address`` (``um``: uffd missing).

    Returns an empty set when no mapping contains the address.
    """
    inside = False
    with open(f"{_proc(pid)}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return frozenset(line.split()[1:])
    return frozenset()


# --- touching pages ------------------------------------------------------------------


def _view(address: int, length: int) -> memoryview:
    return libc.memory_view(address, length)


def read_each_page(address: int, length: int) -> bytes:
    """Read the first byte of every page of the range (one access per page, in C)."""
    return _view(address, length)[::PAGE_SIZE].tobytes()


def write_each_page(address: int, length: int, value: int) -> None:
    """Write ``value`` into the first byte of every page of the range."""
    n = (length + PAGE_SIZE - 1) // PAGE_SIZE
    _view(address, length)[::PAGE_SIZE] = bytes([value]) * n


def page_crcs(address: int, length: int) -> tuple[int, ...]:
    """Return the CRC-32 of every page of the range (reads every byte)."""
    view = _view(address, length)
    return tuple(zlib.crc32(view[o:o + PAGE_SIZE]) for o in range(0, length, PAGE_SIZE))


def data_crcs(data: bytes) -> tuple[int, ...]:
    """Return the CRC-32 of every page-sized piece of ``data`` (compare with page_crcs)."""
    view = memoryview(data)
    return tuple(zlib.crc32(view[o:o + PAGE_SIZE]) for o in range(0, len(data), PAGE_SIZE))


def page_pfns(address: int, length: int, pid: int | None = None) -> tuple[int, ...]:
    """Return the physical frame number of every page of the range (0: not present).

    PFNs are visible to root only (CAP_SYS_ADMIN); otherwise they read as 0.
    """
    with Pagemap(pid) as pm:
        return tuple(p.pfn for p in pm.pages(address, length))


KPF_ZERO_PAGE = 24  # bit of /proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst)


def is_zero_page(pfn: int) -> bool:
    """Tell whether ``pfn`` is the kernel's shared zero page (``/proc/kpageflags``, root)."""
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        raw = f.read(8)
    return len(raw) == 8 and bool(int.from_bytes(raw, "little") >> KPF_ZERO_PAGE & 1)


# --- recording steps -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """What one step did, measured in the process that did the touching."""

    step: str
    who: str  # the process that touched the memory: "self", "peer", ...
    rss_kib: int  # that process's RSS after the step
    present_pages: int  # pages of the range present in its page table (pagemap)
    distinct_pfns: int  # distinct physical pages behind them (1: all the zero page)
    minor_faults: int  # minflt during the step
    major_faults: int  # majflt during the step
    elapsed_ns: int
    note: str = ""


class Step:
    """The mutable side of a step being recorded: the range to inspect and a note."""

    __slots__ = ("address", "length", "note")

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self.note = ""


class Recorder:
    """Collect one :class:`Row` per step of an experiment."""

    def __init__(self) -> None:
        self._rows: list[Row] = []

    @contextmanager
    def step(self, name: str, address: int = 0, length: int = 0, *, pid: int | None = None,
             who: str = "self") -> Iterator[Step]:
        """Measure the body: faults and time in process ``pid``, then RSS and pagemap.

        The body may set ``step.address``/``step.length`` (for a range it creates) and
        ``step.note``.
        """
        st = Step(address, length)
        before = fault_counters(pid)
        t0 = perf_counter_ns()
        yield st
        elapsed = perf_counter_ns() - t0
        after = fault_counters(pid)
        present = distinct = 0
        if st.length:
            with Pagemap(pid) as pm:
                s = pm.summary(st.address, st.length)
            present, distinct = s.present, s.distinct_pfns
        self._rows.append(Row(name, who, rss_kib(pid), present, distinct,
                              after.minor - before.minor, after.major - before.major,
                              elapsed, st.note))

    def annotate(self, note: str) -> None:
        """Set the note of the last row (for facts read after the timed body)."""
        self._rows[-1] = replace(self._rows[-1], note=note)

    def last(self) -> Row:
        return self._rows[-1]

    def rows(self) -> tuple[Row, ...]:
        return tuple(self._rows)
