"""Experiment 3 — replacing a mapping breaks every other holder of the old pages.

Guest memory is a memfd mapped shared by the VMM and by a second process (the role a
vhost-user backend plays). A "restore" that maps the snapshot file over the guest
range with ``mmap(MAP_FIXED|MAP_PRIVATE)`` changes only the VMM's page tables: the peer
keeps the old memfd pages, writes stop propagating in both directions, and anything
the kernel was handed earlier (here: a page vmspliced into a pipe) keeps the old page.
State that belongs to the old mapping goes with it: a userfaultfd registration of the
guest range does not survive the replacement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagein.lab._files import scratch_file, snapshot_bytes
from pagein.lab._probe import (
    MIB,
    PAGE_SIZE,
    Recorder,
    Row,
    data_crcs,
    page_crcs,
    page_pfns,
    vma_flags,
)
from pagein.lab._procs import Peer
from pagein.sys.mapping import Mapping, Memfd
from pagein.sys.pipe import vmsplice
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

__all__ = ["ReplaceMapping", "run"]

_BOOT = 0x11  # every byte of guest memory before the restore


@dataclass(frozen=True, slots=True)
class ReplaceMapping:
    """What the peer and the kernel saw before and after a MAP_FIXED replacement."""

    size_bytes: int
    pages: int
    same_pfns_before: int  # pages backed by the same physical page in guest and peer
    guest_write_seen_by_peer_before: bool
    guest_pages_equal_snapshot: int  # after the replacement, in the VMM's view
    peer_pages_equal_snapshot: int  # after the replacement, in the peer's view
    same_pfns_after: int
    guest_write_seen_by_peer_after: bool
    peer_write_seen_by_guest_after: bool
    pipe_page_is_old_page: bool  # the vmspliced page reads back with the peer's later write
    pipe_page_equals_guest_view: bool
    uffd_registered_before: bool  # the guest range carried a uffd registration (VmFlags um)
    uffd_registered_after: bool  # ... and still does after the replacement
    rows: tuple[Row, ...]


def _same(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(1 for x, y in zip(a, b, strict=True) if x == y and x)


def _seen(writer: Mapping | Peer, reader: Mapping | Peer, offset: int, marker: bytes) -> bool:
    """Write ``marker`` through one view and tell whether the other view reads it."""
    writer.write(offset, marker)
    return reader.read(offset, len(marker)) == marker


def _read_both(rec: Recorder, guest: Mapping, peer: Peer,
               snap_crcs: tuple[int, ...]) -> tuple[int, int]:
    """Read every page in both views; return how many equal the snapshot in each."""
    with rec.step("guest reads every page", guest.address, guest.length) as st:
        guest_same = _same(page_crcs(guest.address, guest.length), snap_crcs)
        st.note = f"{guest_same} pages equal the snapshot"
    with rec.step("peer reads every page", peer.address, peer.length, pid=peer.pid,
                  who="peer") as st:
        peer_same = _same(peer.crcs(), snap_crcs)
        st.note = f"{peer_same} pages equal the snapshot"
    return guest_same, peer_same


def run(size_bytes: int = 64 * MIB) -> ReplaceMapping:
    """Share a memfd with a peer, replace the VMM's mapping of it, and compare views."""
    snap = snapshot_bytes(size_bytes)
    snap_crcs = data_crcs(snap)
    rec = Recorder()
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    with scratch_file(snap) as snap_fd, Memfd.create("pagein-lab-guest", size_bytes) as mfd, \
            Userfaultfd.open(Feature.MISSING_SHMEM) as uffd:
        guest = mfd.map()
        try:
            with rec.step("guest writes every page (boot)", guest.address, size_bytes):
                guest.write(0, bytes([_BOOT]) * size_bytes)
            with Peer(mfd.fileno(), size_bytes) as peer:
                with rec.step("peer reads every page", peer.address, size_bytes,
                              pid=peer.pid, who="peer"):
                    peer.touch()
                same_before = _same(page_pfns(guest.address, size_bytes), peer.pfns())
                seen_before = _seen(guest, peer, PAGE_SIZE + 100, b"guest-before")
                # The pipe takes a reference to the physical page now backing page 0.
                vmsplice(pipe_w, guest.address, PAGE_SIZE)
                # A uffd registration is state of the mapping: it goes with the mapping.
                # Every page is present, so nothing here faults into the (absent) handler.
                uffd.register(guest.address, size_bytes, RegisterMode.MISSING)
                reg_before = "um" in vma_flags(guest.address)
                with rec.step("restore: mmap(MAP_FIXED|MAP_PRIVATE) snapshot over guest",
                              guest.address, size_bytes):
                    restored = Mapping.of_fd(snap_fd, size_bytes, shared=False,
                                             at=guest.address, replace=True)
                guest.release()  # the old range is gone; the new mapping owns the address
                guest = restored
                guest_same, peer_same = _read_both(rec, guest, peer, snap_crcs)
                same_after = _same(page_pfns(guest.address, size_bytes), peer.pfns())
                reg_after = "um" in vma_flags(guest.address)
                g2p = _seen(guest, peer, 2 * PAGE_SIZE, b"guest-after")
                p2g = _seen(peer, guest, 3 * PAGE_SIZE, b"peer-after")
                peer.write(0, b"peer-after-restore")
                piped = os.read(pipe_r, PAGE_SIZE)
                guest_page0 = guest.read(0, PAGE_SIZE)
        finally:
            guest.close()
            os.close(pipe_r)
            os.close(pipe_w)
    return ReplaceMapping(
        size_bytes=size_bytes, pages=size_bytes // PAGE_SIZE,
        same_pfns_before=same_before, guest_write_seen_by_peer_before=seen_before,
        guest_pages_equal_snapshot=guest_same, peer_pages_equal_snapshot=peer_same,
        same_pfns_after=same_after,
        guest_write_seen_by_peer_after=g2p, peer_write_seen_by_guest_after=p2g,
        pipe_page_is_old_page=piped.startswith(b"peer-after-restore"),
        pipe_page_equals_guest_view=piped == guest_page0,
        uffd_registered_before=reg_before, uffd_registered_after=reg_after,
        rows=rec.rows())
