"""Experiment 6 — balloon: MADV_DONTNEED on registered memory raises REMOVE.

A guest balloon (or any ``MADV_DONTNEED``) on uffd-registered memory frees the pages
and queues a REMOVE event; ``madvise`` does not return until the handler has read it,
and while it is unread every fill ioctl fails with EAGAIN. The next touch of a removed
page faults again — and must read zeros: a handler that fills it from the snapshot
again resurrects stale data the guest threw away.
"""

from __future__ import annotations

import selectors
import threading
from dataclasses import dataclass

from pagein._abi.libc import buffer_address
from pagein.lab._files import snapshot_bytes
from pagein.lab._probe import MIB, PAGE_SIZE, Recorder, Row, data_crcs, page_crcs
from pagein.lab._procs import WAIT_S, CopyPolicy, FaultHandler, HandlerStats
from pagein.sys.mapping import Advice, Mapping
from pagein.sys.uffd import Feature, RegisterMode, Remove, Userfaultfd

__all__ = ["Balloon", "run"]


@dataclass(frozen=True, slots=True)
class Balloon:
    """How REMOVE travels, and what a correct and a naive handler make of it."""

    size_bytes: int
    pages: int
    madvise_waits_for_handler: bool  # madvise was still blocked when REMOVE became readable
    fill_while_remove_unread: str  # the fill result then: "Retry" (EAGAIN)
    event_read: str  # what read() returned: "Remove"
    fill_after_reading: str  # the same fill after reading the event: "Filled"
    correct: HandlerStats  # the handler that zero-fills removed ranges
    correct_zero_pages: int  # removed pages that read back as zeros
    naive: HandlerStats  # the handler that copies the snapshot again
    naive_stale_pages: int  # removed pages that read back the snapshot (a bug)
    rows: tuple[Row, ...]


def _ordering() -> tuple[bool, str, str, str]:
    """Show the REMOVE ordering in one process: madvise from a thread, fills from here.

    The thread's madvise runs inside ctypes with the GIL released, and nothing here
    faults on the registered range, so this process can be its own handler.
    """
    src = bytearray(b"\x5a" * PAGE_SIZE)
    src_address = buffer_address(src)
    with Mapping.anonymous(2 * PAGE_SIZE) as m, \
            Userfaultfd.open(Feature.EVENT_REMOVE) as uffd:
        uffd.register(m.address, m.length, RegisterMode.MISSING)
        uffd.copy(m.address, src_address, PAGE_SIZE)
        t = threading.Thread(target=m.madvise, args=(Advice.DONTNEED, 0, PAGE_SIZE))
        t.start()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(uffd.fileno(), selectors.EVENT_READ)
                readable = bool(sel.select(WAIT_S))
            waited = readable and t.is_alive()
            during = uffd.copy(m.address + PAGE_SIZE, src_address, PAGE_SIZE)
            events = uffd.read_events()
        finally:
            t.join(WAIT_S)
        after = uffd.copy(m.address + PAGE_SIZE, src_address, PAGE_SIZE)
        kinds = ",".join(type(e).__name__ for e in events) or "nothing"
        if not any(isinstance(e, Remove) for e in events):
            kinds += " (no Remove!)"
        uffd.unregister(m.address, m.length)
    return waited, type(during).__name__, kinds, type(after).__name__


def _serve(rec: Recorder, label: str, snap: bytes, balloon_aware: bool) -> tuple[HandlerStats,
                                                                              tuple[int, ...]]:
    """Restore, balloon the second half, touch it again; return stats and its page CRCs."""
    size = len(snap)
    half = size // PAGE_SIZE // 2 * PAGE_SIZE
    src = bytearray(snap)  # alive until the handler is stopped
    with Mapping.anonymous(size) as m, Userfaultfd.open(Feature.EVENT_REMOVE) as uffd:
        uffd.register(m.address, size, RegisterMode.MISSING)
        policy = CopyPolicy(m.address, buffer_address(src), balloon_aware=balloon_aware)
        with FaultHandler(uffd, policy, (m.address, size)) as handler:
            with rec.step(f"{label}: guest reads every page", m.address, size):
                page_crcs(m.address, size)
            with rec.step(f"{label}: balloon: MADV_DONTNEED the second half", m.address,
                          size):
                m.madvise(Advice.DONTNEED, half, size - half)
            with rec.step(f"{label}: guest reads the ballooned half", m.address, size):
                crcs = page_crcs(m.address + half, size - half)
            stats = handler.stop()
        uffd.unregister(m.address, size)
    del src
    return stats, crcs


def run(size_bytes: int = 64 * MIB) -> Balloon:
    """Show the REMOVE ordering, then balloon with a correct and with a naive handler."""
    waited, during, kinds, after = _ordering()
    snap = snapshot_bytes(size_bytes)
    half = size_bytes // PAGE_SIZE // 2
    zero_crc = data_crcs(bytes(PAGE_SIZE))[0]
    snap_back = data_crcs(snap)[half:]
    rec = Recorder()
    good, good_crcs = _serve(rec, "zero-fill handler", snap, True)
    rec.annotate(f"{good_crcs.count(zero_crc)} pages read zeros")
    bad, bad_crcs = _serve(rec, "naive handler", snap, False)
    stale = sum(1 for a, b in zip(bad_crcs, snap_back, strict=True) if a == b)
    rec.annotate(f"{stale} pages read the stale snapshot")
    return Balloon(
        size_bytes=size_bytes, pages=size_bytes // PAGE_SIZE,
        madvise_waits_for_handler=waited, fill_while_remove_unread=during, event_read=kinds,
        fill_after_reading=after, correct=good, correct_zero_pages=good_crcs.count(zero_crc),
        naive=bad, naive_stale_pages=stale, rows=rec.rows())
