"""Diff snapshots of a VM and restores of a chain of them (format: :mod:`pagein.snapshot.chain`).

Writing: :func:`write_diff_memory` stores only the pages the dirty log
(:mod:`pagein.vmm.dirty`) reports, at their offsets in a sparse memory file of the full
size; :func:`layer_doc` links the layer to its parent by path and the SHA-256 of the
parent's state and layer files, and records the chain's index with the new layer on
top (so opening the chain later reads that one index).

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
    MAX_DEPTH,
    STATE_FILE,
    Chain,
    ChainReader,
    LayerDoc,
    file_sha256,
    map_chain,
    pack_pages,
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


def write_diff_memory(memory: GuestMemory, pages: Bits, path: str) -> tuple[int, str, Bits]:
    """Write the ``pages`` of guest RAM at their offsets into a sparse file of full size.

    Returns ``(bytes of page data written, SHA-256 of the pages' bytes in page order,
    the pages found all zero)``. All-zero pages are not written: they stay holes, and
    the layer's index says they read as zeros.
    """
    sha = hashlib.sha256()
    written = 0
    zero = np.zeros(pages.size, dtype=bool)
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
                    written += _write_nonzero(fd, chunk, (base + p) * PAGE_SIZE,
                                              zero[base + p: base + p + n])
            base += count
        os.ftruncate(fd, base * PAGE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, sha.hexdigest(), zero


def _write_nonzero(fd: int, chunk: bytes, offset: int, zero: Bits) -> int:
    """pwrite the runs of non-zero pages of ``chunk`` at ``offset``; mark the zero pages
    in ``zero`` (one bool per page of the chunk). Returns the bytes written."""
    zero[:] = ~np.frombuffer(chunk, np.uint64).reshape(-1, PAGE_SIZE // 8).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([1], zero.view(np.int8), [1]))))
    view = memoryview(chunk)
    written = 0
    for s, e in zip(edges[::2], edges[1::2], strict=True):
        a, b = int(s) * PAGE_SIZE, int(e) * PAGE_SIZE
        os.pwrite(fd, view[a:b], offset + a)
        written += b - a
    return written


def layer_doc(parent: tuple[str, str], directory: str, memory_bytes: int, pages: Bits,
              zero: Bits, data_sha256: str) -> LayerDoc:
    """The ``layer`` document of a diff in ``directory`` on ``parent`` (dir, state SHA):
    its links to the parent, and the chain's index with this layer on top.

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
    below = resolve_chain(parent_dir)
    if any(layer.directory == target for layer in below.layers):
        raise ValueError(f"--out {directory} is a layer of this VM's own chain: write the "
                         "diff into a new directory")
    if below.memory_bytes != memory_bytes:
        raise SnapshotFormatError(f"the parent snapshot {parent_dir} holds "
                                  f"{below.memory_bytes} bytes of memory, this VM "
                                  f"{memory_bytes}: take a full snapshot (without --diff)")
    if below.depth + 1 > MAX_DEPTH:
        raise ValueError(f"the chain under {parent_dir} is {below.depth} diffs deep, the "
                         f"most a chain holds is {MAX_DEPTH}: squash it (pagein snapshot "
                         "squash) or take a full snapshot")
    top = below.layers[-1]
    parent_layer = None if top.doc is None else file_sha256(
        os.path.join(top.directory, LAYER_FILE))
    index = below.index.with_layer(below.depth + 1, pages, zero)
    rel = os.path.relpath(os.path.realpath(parent_dir), target)
    return LayerDoc(rel, parent_sha, parent_layer, below.depth + 1, memory_bytes,
                    pack_pages(pages), data_sha256, len(index), index.encode())


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
    """Copy the flattened chain into fresh guest memory (the copy backend), with
    ``pread`` from each run's layer: no mapping, so no ``vm.max_map_count`` limit."""
    reader = ChainReader(chain)
    try:
        for stored, m in zip(snap.regions, regions, strict=True):
            view = m.view()
            try:
                for off in range(0, stored.size, 64 << 20):
                    n = min(64 << 20, stored.size - off)
                    reader.read_into(stored.offset + off, view[off: off + n])
            finally:
                view.release()
    finally:
        reader.close()


def verify_chain(chain: Chain) -> None:
    """Hash every layer's memory (the full one whole, each diff's pages) against its record.

    Raises :class:`~pagein.errors.IntegrityError` naming the first layer that differs.
    """
    from pagein.vmm.snapshot import load_snapshot, verify_memory

    verify_memory(load_snapshot(chain.layers[0].directory))
    for layer in chain.layers[1:]:
        assert layer.doc is not None  # every layer above the bottom is a diff
        sha = hashlib.sha256()
        idx = np.flatnonzero(layer.doc.changed_pages())
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
    """The flattened chain mapped copy-on-write as guest memory (the file backend).

    Raises :class:`~pagein.errors.Unavailable` when the chain is too fragmented for
    ``vm.max_map_count`` (one mapping per run), naming the backends that are not."""
    return map_chain(chain, shared=False, prot=Prot.READ | Prot.WRITE,
                     remedy=", or restore it with --backend copy or uffd (they read the "
                            "chain without mapping it)")


def squash(directory: str, out: str) -> Snapshot:
    """Fold the chain under the layer in ``directory`` into one full snapshot in ``out``.

    The result restores exactly as the layer does, with no parents. Everything is
    checked first (:func:`chain_of`); files are written under temporary names and
    renamed, the state last. Raises ``ValueError`` when ``out`` is a layer of the chain.
    """
    from pagein.vmm.snapshot import encode_state, load_snapshot, read_state

    snap = load_snapshot(directory)
    chain = chain_of(snap)
    target = os.path.realpath(out)
    if any(layer.directory == target for layer in chain.layers):
        raise ValueError(f"--out {out} is a layer of the chain being squashed: write the "
                         "full snapshot into a new directory")
    doc = read_state(snap.state_path)
    os.makedirs(out, exist_ok=True)
    mem_tmp = os.path.join(out, ".memory.tmp")
    size, sha = _write_flat(chain, mem_tmp)
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


def _write_flat(chain: Chain, path: str) -> tuple[int, str]:
    """Write the flattened chain to ``path`` as one raw memory file (read with ``pread``,
    so a chain too fragmented to map squashes too); all-zero 1 MiB chunks stay holes.
    Returns ``(bytes, SHA-256 hex)``."""
    sha = hashlib.sha256()
    buf = bytearray(_CHUNK_PAGES * PAGE_SIZE)
    reader = ChainReader(chain)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, chain.memory_bytes, len(buf)):
            view = memoryview(buf)[: min(len(buf), chain.memory_bytes - off)]
            reader.read_into(off, view)
            sha.update(view)
            if np.frombuffer(view, np.uint64).any():
                os.pwrite(fd, view, off)
        os.ftruncate(fd, chain.memory_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
        reader.close()
    return chain.memory_bytes, sha.hexdigest()
