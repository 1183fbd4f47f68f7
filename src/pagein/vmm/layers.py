"""Diff snapshots of a VM and restores of a chain of them (format: :mod:`pagein.snapshot.chain`).

Writing: :func:`write_diff_memory` stores only the pages the dirty log
(:mod:`pagein.vmm.dirty`) reports, at their offsets in a sparse memory file of the full
size; :func:`layer_doc` links the layer to its parent by path and the SHA-256 of the
parent's state file.

Restoring: :func:`chain_of` resolves and checks the whole chain before any guest runs;
:func:`copy_chain` and :func:`map_chain_private` build guest memory from the flattened
chain for the copy and file backends (the uffd backend serves :class:`ChainSource`);
:func:`squash` folds a chain into one full snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagein._abi.mman import Prot
from pagein.errors import IntegrityError, SnapshotFormatError
from pagein.snapshot.chain import (
    LAYER_FILE,
    STATE_FILE,
    Chain,
    LayerDoc,
    file_sha256,
    map_chain,
    resolve_chain,
)
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.vmm.memory import GuestMemory

if TYPE_CHECKING:
    from pagein.vmm.snapshot import Snapshot

__all__ = ["chain_of", "copy_chain", "layer_doc", "map_chain_private", "squash",
           "verify_chain", "write_diff_memory"]

_CHUNK_PAGES = 256          # 1 MiB per read of guest memory
Bits = npt.NDArray[np.bool_]


def write_diff_memory(memory: GuestMemory, pages: Bits, path: str) -> tuple[int, str]:
    """Write the ``pages`` of guest RAM at their offsets into a sparse file of full size.

    Returns ``(bytes of page data written, SHA-256 of the pages' bytes in page order)``.
    Runs that are all zero stay holes (they read as zeros, as the guest has them).
    """
    sha = hashlib.sha256()
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        base = 0  # page index of the region's start in the memory file
        for region in memory.regions:
            count = region.size // PAGE_SIZE
            idx = np.flatnonzero(pages[base: base + count])
            # Runs of consecutive changed pages, read in bounded chunks, one region at a
            # time: a read never crosses a region's end.
            runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if idx.size else []
            for run in runs:
                first, n_run = int(run[0]), int(run.size)
                for p in range(first, first + n_run, _CHUNK_PAGES):
                    n = min(_CHUNK_PAGES, first + n_run - p)
                    chunk = region.mapping.read(p * PAGE_SIZE, n * PAGE_SIZE)
                    sha.update(chunk)
                    if chunk.count(0) != len(chunk):
                        os.pwrite(fd, chunk, (base + p) * PAGE_SIZE)
                        written += len(chunk)
            base += count
        os.ftruncate(fd, base * PAGE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, sha.hexdigest()


def layer_doc(parent: tuple[str, str], directory: str, memory_bytes: int, pages: Bits,
              data_sha256: str) -> LayerDoc:
    """The ``layer`` document of a diff in ``directory`` on ``parent`` (dir, state SHA).

    Raises :class:`~pagein.errors.IntegrityError` when the parent's state file changed
    since this VM was restored from or snapshotted to it, and ``ValueError`` when the
    diff would overwrite a layer of its own chain.
    """
    parent_dir, parent_sha = parent
    try:
        now = file_sha256(os.path.join(parent_dir, STATE_FILE))
    except FileNotFoundError:
        now = None
    if now != parent_sha:
        raise IntegrityError(f"the parent snapshot {parent_dir} of this VM was changed or "
                             "removed since the VM was restored from or snapshotted to it: "
                             "take a full snapshot (without --diff)")
    target = os.path.realpath(directory)
    if any(layer.directory == target for layer in resolve_chain(parent_dir).layers):
        raise ValueError(f"--out {directory} is a layer of this VM's own chain: write the "
                         "diff into a new directory")
    rel = os.path.relpath(os.path.realpath(parent_dir), target)
    return LayerDoc(rel, parent_sha, memory_bytes, pages, data_sha256)


def chain_of(snap: Snapshot) -> Chain:
    """Resolve the chain under ``snap`` and check it binds to ``snap``'s state file."""
    chain = resolve_chain(snap.directory)
    top = chain.layers[-1]
    lpath = os.path.join(snap.directory, LAYER_FILE)
    if (top.doc is None) != (snap.layer_sha256 is None):
        what = "has a layer file its state file does not record" if top.doc is not None \
            else "records a layer file that is missing"
        raise SnapshotFormatError(f"snapshot {snap.directory} {what}: take it again")
    if snap.layer_sha256 is not None and file_sha256(lpath) != snap.layer_sha256:
        raise IntegrityError(f"snapshot layer file {lpath} is not the one its state file "
                             "records (altered or replaced)")
    if chain.memory_bytes != snap.memory_bytes:
        raise SnapshotFormatError(f"snapshot chain of {snap.directory} holds "
                                  f"{chain.memory_bytes} bytes of memory, its state file "
                                  f"{snap.memory_bytes}")
    return chain


def copy_chain(chain: Chain, snap: Snapshot, regions: list[Mapping]) -> None:
    """Copy the flattened chain into fresh guest memory (the copy backend)."""
    with map_chain(chain, shared=True, prot=Prot.READ) as src:
        view = src.view()
        try:
            for stored, m in zip(snap.regions, regions, strict=True):
                for off in range(0, stored.size, 64 << 20):
                    n = min(64 << 20, stored.size - off)
                    m.write(off, view[stored.offset + off: stored.offset + off + n])
        finally:
            view.release()


def verify_chain(chain: Chain) -> None:
    """Hash every layer's memory (the full one whole, each diff's pages) against its record.

    Raises :class:`~pagein.errors.IntegrityError` naming the first layer that differs.
    """
    from pagein.vmm.snapshot import load_snapshot, verify_memory

    verify_memory(load_snapshot(chain.layers[0].directory))
    for layer in chain.layers[1:]:
        assert layer.doc is not None  # every layer above the bottom is a diff
        sha = hashlib.sha256()
        idx = np.flatnonzero(layer.doc.pages)
        with open(layer.memory_path, "rb", buffering=0) as f:
            for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if idx.size else []:
                f.seek(int(run[0]) * PAGE_SIZE)
                left = int(run.size) * PAGE_SIZE
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise IntegrityError(f"snapshot layer {layer.directory}: its memory "
                                             "file ends before its last changed page")
                    sha.update(chunk)
                    left -= len(chunk)
        if sha.hexdigest() != layer.doc.data_sha256:
            raise IntegrityError(f"snapshot layer {layer.directory} is corrupted: the SHA-256 "
                                 "of its changed pages does not match its layer file")


def map_chain_private(chain: Chain) -> Mapping:
    """The flattened chain mapped copy-on-write as guest memory (the file backend)."""
    return map_chain(chain, shared=False, prot=Prot.READ | Prot.WRITE)


def squash(directory: str, out: str) -> Snapshot:
    """Fold the chain under the layer in ``directory`` into one full snapshot in ``out``.

    The result restores exactly as the layer does, with no parents. Everything is
    checked first (:func:`chain_of`); files are written under temporary names and
    renamed, the state last. Raises ``ValueError`` when ``out`` is a layer of the chain.
    """
    from pagein.vmm.memory import Region
    from pagein.vmm.snapshot import encode_state, load_snapshot, read_state, write_memory

    snap = load_snapshot(directory)
    chain = chain_of(snap)
    target = os.path.realpath(out)
    if any(layer.directory == target for layer in chain.layers):
        raise ValueError(f"--out {out} is a layer of the chain being squashed: write the "
                         "full snapshot into a new directory")
    doc = read_state(snap.state_path)
    os.makedirs(out, exist_ok=True)
    mem_tmp = os.path.join(out, ".memory.tmp")
    with map_chain(chain, shared=True, prot=Prot.READ) as whole:
        regions = [Region(r.guest_phys, Mapping(whole.address + r.offset, r.size, owned=False))
                   for r in snap.regions]
        size, sha = write_memory(GuestMemory.from_mappings(regions), mem_tmp)
    doc["memory"] = {**doc["memory"], "file_bytes": size, "sha256": sha}
    doc["layer"] = None
    state_tmp = os.path.join(out, ".vmstate.tmp")
    with open(state_tmp, "wb") as f:
        f.write(encode_state(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(mem_tmp, os.path.join(out, "memory"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, LAYER_FILE))
    os.replace(state_tmp, os.path.join(out, STATE_FILE))
    return load_snapshot(out)
