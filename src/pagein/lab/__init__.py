"""The lab: experiments that make the Linux memory model behind lazy restore observable.

Each experiment is a function ``run(size_bytes) -> result`` that drives the real kernel
mechanism (mmap, memfd, userfaultfd, vmsplice...) and returns a frozen dataclass of
measured facts, including ``rows``: one :class:`~pagein.lab._probe.Row` per step, with
the RSS, pagemap and fault counters of the process that did the touching.
:data:`EXPERIMENTS` lists them in reading order; ``pagein lab`` shows them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pagein.lab import balloon, cost, demand, filemap, fill, guest, replace, zero
from pagein.lab._probe import MIB, Row

__all__ = ["EXPERIMENTS", "Experiment", "LabResult", "Row", "find"]


class LabResult(Protocol):
    """What every experiment returns: a frozen dataclass with at least ``rows``."""

    @property
    def rows(self) -> tuple[Row, ...]: ...


@dataclass(frozen=True, slots=True)
class Experiment:
    """One lab experiment: its CLI name, a title, two lines of explanation, and its runner."""

    name: str
    title: str
    explanation: tuple[str, str]
    run: Callable[[int], LabResult]
    default_size_bytes: int = 64 * MIB
    min_size_bytes: int = MIB  # below this the experiment has too few pages to show anything


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "demand-paging", "Demand paging: mmap commits nothing, the first touch allocates",
        ("An anonymous mmap only reserves addresses; reading an untouched page maps the one "
         "shared zero page,",
         "the first write faults again and allocates a real page; a transparent huge page "
         "maps 512 pages per fault."),
        demand.run),
    Experiment(
        "file-mappings", "File mappings: one page cache, copy-on-write, fault-around",
        ("MAP_SHARED and MAP_PRIVATE of one file read the same page-cache pages, several "
         "per fault (fault-around);",
         "a private write copies the page and leaves the file alone, but unwritten private "
         "pages keep following the file."),
        filemap.run),
    Experiment(
        "replace-mapping", "Replacing a mapping: MAP_FIXED|MAP_PRIVATE restore breaks sharing",
        ("Guest memory is a memfd shared with a peer; a restore by mmap(MAP_FIXED|MAP_PRIVATE) "
         "of the snapshot",
         "changes only the VMM's page tables: the peer and a vmspliced page keep the old "
         "pages, writes stop flowing."),
        replace.run),
    Experiment(
        "uffd-fill", "userfaultfd fill: restore into the shared mapping without replacing it",
        ("MISSING+COPY allocates each restored page in the memfd's page cache; "
         "MINOR+CONTINUE maps pages already there.",
         "The mapping is never replaced, so the peer sees every restored byte and the "
         "same physical pages."),
        fill.run),
    Experiment(
        "zero-pages", "Zero pages and file holes: the cheapest page is one never stored",
        ("Untouched anonymous memory and UFFDIO_ZEROPAGE map one zero page; copying zeros "
         "and shmem holes cost a page each.",
         "Reading file holes allocates no disk blocks, and SEEK_DATA/SEEK_HOLE find the "
         "data without reading it."),
        zero.run, min_size_bytes=4 * MIB),
    Experiment(
        "balloon", "Balloon: MADV_DONTNEED on registered memory raises REMOVE",
        ("madvise(DONTNEED) frees the pages and waits for the handler to read REMOVE; "
         "until then fills fail with EAGAIN.",
         "The next touch faults again and must read zeros: refilling from the snapshot "
         "resurrects stale data."),
        balloon.run),
    Experiment(
        "fault-cost", "The cost of a page fault on this machine",
        ("One byte of every page, touched five ways: kernel anonymous (write, zero-page "
         "read), kernel file (warm, cold),",
         "and a userfaultfd round trip through the Python handler on the same and another "
         "CPU. Measured, not asserted."),
        cost.run),
    Experiment(
        "guest-view", "The guest's view: a missing guest page, through KVM, to userfaultfd",
        ("A guest paused at READY is restored by copy and by userfaultfd; a missing page "
         "faults in KVM's MMU, which faults",
         "on the VMM's mapping inside KVM_RUN: the handler sees every fault, the VMM not one "
         "extra exit."),
        guest.run, min_size_bytes=2 * MIB),
)


def find(name: str) -> Experiment:
    """Return the experiment called ``name``; raise ``KeyError`` listing the known names."""
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(f"no lab experiment {name!r}; choose one of: "
                   f"{', '.join(e.name for e in EXPERIMENTS)}")
