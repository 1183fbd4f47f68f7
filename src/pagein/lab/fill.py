"""Experiment 4 — userfaultfd restores into the mapping the peer already shares.

The same restore as experiment 3, without replacing anything: the guest range stays
the shared memfd mapping, registered with userfaultfd. In MISSING mode the handler
copies each snapshot page in with ``UFFDIO_COPY``, which allocates the page *in the
memfd's page cache*; in MINOR mode the snapshot already sits in the memfd's page cache
and ``UFFDIO_CONTINUE`` only maps it. Either way the peer sees every restored byte and
writes keep flowing both ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagein._abi.mman import Prot
from pagein.lab._files import scratch_file, snapshot_bytes
from pagein.lab._probe import MIB, PAGE_SIZE, Recorder, Row, data_crcs, page_crcs, page_pfns
from pagein.lab._procs import ContinuePolicy, CopyPolicy, FaultHandler, HandlerStats, Peer, Policy
from pagein.sys.mapping import Mapping, Memfd
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

__all__ = ["FillRun", "UffdFill", "run"]


@dataclass(frozen=True, slots=True)
class FillRun:
    """One uffd restore of a shared memfd, seen from the guest and from the peer."""

    mode: str  # "MISSING+COPY" or "MINOR+CONTINUE"
    handler: HandlerStats
    guest_pages_equal_snapshot: int
    peer_pages_equal_snapshot: int
    same_pfns: int  # pages backed by the same physical page in guest and peer
    guest_write_seen_by_peer: bool
    peer_write_seen_by_guest: bool


@dataclass(frozen=True, slots=True)
class UffdFill:
    """Both uffd restores of ``size_bytes`` of shared guest memory."""

    size_bytes: int
    pages: int
    missing_copy: FillRun
    minor_continue: FillRun
    rows: tuple[Row, ...]


def _same(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(1 for x, y in zip(a, b, strict=True) if x == y and x)


def _restore(rec: Recorder, mfd: Memfd, mode: RegisterMode, policy: Policy,
             snap_crcs: tuple[int, ...]) -> FillRun:
    """Register the guest's shared mapping of ``mfd``, serve its faults, compare views."""
    size = mfd.size
    name = "MISSING+COPY" if mode == RegisterMode.MISSING else "MINOR+CONTINUE"
    need = Feature.MISSING_SHMEM if mode == RegisterMode.MISSING else Feature.MINOR_SHMEM
    with mfd.map() as guest, Peer(mfd.fileno(), size) as peer, \
            Userfaultfd.open(need) as uffd:
        uffd.register(guest.address, size, mode)
        if isinstance(policy, CopyPolicy):
            policy.base = guest.address
        with FaultHandler(uffd, policy, (guest.address, size)) as handler:
            with rec.step(f"{name}: guest reads every page", guest.address, size) as st:
                guest_crcs = page_crcs(guest.address, size)
                st.note = f"{_same(guest_crcs, snap_crcs)} pages equal the snapshot"
            stats = handler.stop()
        with rec.step(f"{name}: peer reads every page", peer.address, size, pid=peer.pid,
                      who="peer") as st:
            peer_crcs = peer.crcs()
            st.note = f"{_same(peer_crcs, snap_crcs)} pages equal the snapshot"
        same = _same(page_pfns(guest.address, size), peer.pfns())
        guest.write(PAGE_SIZE, b"guest-after")
        g2p = peer.read(PAGE_SIZE, 11) == b"guest-after"
        peer.write(2 * PAGE_SIZE, b"peer-after")
        p2g = guest.read(2 * PAGE_SIZE, 10) == b"peer-after"
        uffd.unregister(guest.address, size)
    return FillRun(name, stats, _same(guest_crcs, snap_crcs), _same(peer_crcs, snap_crcs),
                   same, g2p, p2g)


def run(size_bytes: int = 64 * MIB) -> UffdFill:
    """Restore shared guest memory twice: MISSING+COPY, then MINOR+CONTINUE."""
    snap = snapshot_bytes(size_bytes)
    snap_crcs = data_crcs(snap)
    rec = Recorder()
    with scratch_file(snap) as snap_fd, \
            Mapping.of_fd(snap_fd, size_bytes, shared=False, prot=Prot.READ) as source, \
            Memfd.create("pagein-lab-guest", size_bytes) as mfd:
        # The handler is forked after this mapping exists, so `source` is valid in it.
        copy = _restore(rec, mfd, RegisterMode.MISSING, CopyPolicy(0, source.address), snap_crcs)
    with Memfd.create("pagein-lab-guest-minor", size_bytes) as mfd:
        with rec.step("MINOR: write the snapshot into the memfd page cache (pwrite)"):
            for off in range(0, size_bytes, 4 * MIB):
                os.pwrite(mfd.fileno(), snap[off:off + 4 * MIB], off)
        minor = _restore(rec, mfd, RegisterMode.MINOR, ContinuePolicy(), snap_crcs)
    return UffdFill(size_bytes, size_bytes // PAGE_SIZE, copy, minor, rec.rows())
