"""Layered snapshots: a diff layer holds only the pages that changed since its parent.

A layer is a snapshot directory whose ``memory`` file has the full size of guest RAM
but holds data only at the pages that changed (everything else is a hole), plus a
``layer`` file naming those pages and the parent::

    offset  size  field
    0       8     magic  b"PGLAYER1"
    8       4     format version, u32 little-endian (1)
    12      4     flags, u32, 0
    16      8     body length in bytes, u64
    24      32    SHA-256 of the body
    56      ...   body: UTF-8 JSON object
                    parent         {path: the parent directory, relative to this one,
                                    state_sha256: SHA-256 of the parent's whole state file}
                    memory_bytes   size of the memory file (equal in every layer)
                    pages          bitmap, one bit per 4 KiB page of the memory file
                                   (bit i = byte i // 8, bit i % 8), zlib-compressed
                                   (mostly zeros: a few hundred bytes), base64
                    data_sha256    SHA-256 of the changed pages' bytes, in page order

The bottom of a chain is a full snapshot (no ``layer`` file). :func:`resolve_chain`
walks from the top to the bottom and refuses a missing, replaced or reordered parent
(its state file's SHA-256 differs from the one recorded), a loop, or a depth above
:data:`MAX_DEPTH`, each time naming the layer. :meth:`Chain.flatten` folds the chain
into one index (the owning layer of every page), built once at open with numpy in time
proportional to the changed pages; :func:`map_chain` then maps every run of pages
from its owning layer's file into one contiguous range, so a reader (the fault core,
a copy restore, a file restore) does one lookup and one copy per page whatever the
depth: the kernel's page tables are the index.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pagein._abi.mman import Prot
from pagein.errors import IntegrityError, SnapshotFormatError
from pagein.snapshot.raw import data_extents
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping

__all__ = ["LAYER_FILE", "MAX_DEPTH", "MEMORY_FILE", "STATE_FILE", "Chain", "ChainSource",
           "Layer", "LayerDoc", "encode_layer", "file_sha256", "map_chain", "read_layer",
           "resolve_chain"]

LAYER_FILE = "layer"
STATE_FILE = "vmstate"
MEMORY_FILE = "memory"
MAGIC = b"PGLAYER1"
VERSION = 1
MAX_DEPTH = 65535            # owners are u16: deeper chains must be squashed first
_HEADER = struct.Struct("<8sIIQ32s")
_MAX_BODY = 64 << 20          # a bitmap of 64 GiB of RAM is 2 MiB; anything larger is garbage
Bits = npt.NDArray[np.bool_]


def file_sha256(path: str) -> str:
    """SHA-256 of a whole (small) file in hex; raises FileNotFoundError."""
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass(frozen=True, slots=True)
class LayerDoc:
    """The decoded ``layer`` file of one diff layer."""

    parent_path: str          # as recorded: relative to the layer's directory
    parent_state_sha256: str
    memory_bytes: int
    pages: Bits               # one bool per page of the memory file
    data_sha256: str


def encode_layer(doc: LayerDoc) -> bytes:
    """Frame a layer document: header (magic, version, length, SHA-256) + JSON body."""
    body = json.dumps({
        "parent": {"path": doc.parent_path, "state_sha256": doc.parent_state_sha256},
        "memory_bytes": doc.memory_bytes,
        "pages": base64.b64encode(zlib.compress(
            np.packbits(doc.pages, bitorder="little").tobytes(), 1)).decode(),
        "data_sha256": doc.data_sha256}, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def _bad(path: str, why: str) -> SnapshotFormatError:
    return SnapshotFormatError(f"snapshot layer file {path} {why}; take the diff snapshot again")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def read_layer(path: str) -> LayerDoc:
    """Read and check one ``layer`` file; every error names the file and the field."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size + _MAX_BODY + 1)
    if len(raw) < _HEADER.size:
        raise _bad(path, f"is truncated ({len(raw)} bytes, shorter than its header)")
    magic, version, flags, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise _bad(path, f"is not a pagein layer file (magic {magic!r})")
    if version != VERSION or flags:
        raise _bad(path, f"has version {version} flags 0x{flags:x}; this pagein reads "
                         f"version {VERSION} without flags")
    body = raw[_HEADER.size:]
    if len(body) != length:
        raise _bad(path, f"has a {len(body)}-byte body, its header says {length}")
    if hashlib.sha256(body).digest() != digest:
        raise IntegrityError(f"snapshot layer file {path} is corrupted: the SHA-256 of its "
                             "body does not match the header")
    try:
        obj = json.loads(body)
        parent, size = obj["parent"], obj["memory_bytes"]
        ppath, psha, pages_b64, dsha = (parent["path"], parent["state_sha256"], obj["pages"],
                                        obj["data_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(path, f"has a malformed body (missing or wrong field {e})") from None
    if not isinstance(ppath, str) or not ppath or "\0" in ppath:
        raise _bad(path, "field parent.path is not a directory path")
    if not _hex64(psha) or not _hex64(dsha):
        raise _bad(path, "field parent.state_sha256 or data_sha256 is not a SHA-256 in hex")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
        raise _bad(path, f"field memory_bytes is {size!r}, not a positive multiple of 4096")
    npages = size // PAGE_SIZE
    want = -(-npages // 8)
    try:
        inflate = zlib.decompressobj()
        # Bounded: a body that inflates past the bitmap's size is refused, not expanded.
        packed = inflate.decompress(base64.b64decode(pages_b64, validate=True), want + 1)
        complete = inflate.eof and not inflate.unconsumed_tail
    except (binascii.Error, TypeError, ValueError, zlib.error):
        raise _bad(path, "field pages is not base64 of a zlib stream") from None
    if len(packed) != want or not complete:
        raise _bad(path, f"field pages holds {len(packed)}{'' if complete else '+'} bytes, "
                         f"{want} expected for {npages} pages")
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=npages,
                         bitorder="little").view(bool)
    return LayerDoc(ppath, psha, size, bits, dsha)


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of a resolved chain: its directory and (for a diff) its pages."""

    directory: str
    doc: LayerDoc | None      # None: the full snapshot at the bottom

    @property
    def memory_path(self) -> str:
        return os.path.join(self.directory, MEMORY_FILE)


@dataclass(frozen=True, slots=True)
class Chain:
    """Layers bottom (full snapshot) first, top (the one restored) last."""

    layers: tuple[Layer, ...]
    memory_bytes: int

    @property
    def depth(self) -> int:
        """Number of diff layers above the full snapshot."""
        return len(self.layers) - 1

    def flatten(self) -> npt.NDArray[np.uint16]:
        """The index: for every page, the layer whose bytes it has (top-most wins)."""
        owner = np.zeros(self.memory_bytes // PAGE_SIZE, dtype=np.uint16)
        for i, layer in enumerate(self.layers[1:], 1):
            assert layer.doc is not None  # every layer above the bottom is a diff
            owner[layer.doc.pages] = i
        return owner

    def runs(self, owner: npt.NDArray[np.uint16] | None = None) -> list[tuple[int, int, int]]:
        """``(offset, length, layer)`` runs of pages owned by one layer, in file order."""
        owner = self.flatten() if owner is None else owner
        cuts = np.flatnonzero(np.diff(owner)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [owner.size]))
        return [(int(s) * PAGE_SIZE, int(e - s) * PAGE_SIZE, int(owner[s]))
                for s, e in zip(starts, ends, strict=True)]


def resolve_chain(directory: str) -> Chain:
    """Walk from the layer in ``directory`` down to its full snapshot; check every link.

    Raises :class:`~pagein.errors.SnapshotFormatError` for a missing parent, a loop, a
    chain deeper than :data:`MAX_DEPTH` or layers of different sizes, and
    :class:`~pagein.errors.IntegrityError` when a parent's state file is not the one the
    layer above recorded (altered, replaced, or layers put in another order).
    """
    layers: list[Layer] = []
    seen: set[str] = set()
    here = os.path.realpath(directory)
    size: int | None = None
    while True:
        if here in seen:
            raise SnapshotFormatError(f"snapshot chain of {directory} loops back to layer "
                                      f"{here}: a layer cannot be its own ancestor")
        if len(layers) > MAX_DEPTH:
            raise SnapshotFormatError(f"snapshot chain of {directory} is deeper than "
                                      f"{MAX_DEPTH} layers: squash it (pagein snapshot squash)")
        seen.add(here)
        lpath = os.path.join(here, LAYER_FILE)
        doc = read_layer(lpath) if os.path.exists(lpath) else None
        layers.append(Layer(here, doc))
        if doc is None:
            break
        if size is not None and doc.memory_bytes != size:
            raise SnapshotFormatError(f"snapshot layer {here} has {doc.memory_bytes} bytes of "
                                      f"memory, the layer above it {size}: not one VM's chain")
        size = doc.memory_bytes
        parent = os.path.realpath(os.path.join(here, doc.parent_path))
        state = os.path.join(parent, STATE_FILE)
        try:
            sha = file_sha256(state)
        except (FileNotFoundError, NotADirectoryError):
            raise SnapshotFormatError(f"snapshot layer {here}: its parent {parent} is missing "
                                      f"(no {STATE_FILE} there); restore needs every layer "
                                      "of the chain") from None
        if sha != doc.parent_state_sha256:
            raise IntegrityError(f"snapshot layer {here}: its parent {parent} is not the "
                                 "snapshot it was taken on (the parent's state file changed: "
                                 "altered, replaced, or layers reordered)")
        here = parent
    layers.reverse()
    base_size = os.stat(layers[0].memory_path).st_size if os.path.exists(
        layers[0].memory_path) else None
    if size is not None and base_size is not None and base_size != size:
        raise SnapshotFormatError(f"snapshot {layers[0].directory} has a {base_size}-byte "
                                  f"memory file, its diff layers {size}: not one VM's chain")
    return Chain(tuple(layers), size if size is not None else (base_size or 0))


def map_chain(chain: Chain, *, shared: bool, prot: Prot,
              owner: npt.NDArray[np.uint16] | None = None) -> Mapping:
    """Map the flattened chain as one range: offset ``o`` reads the top-most layer's page.

    The bottom memory file is mapped whole, then every run owned by a diff layer is
    mapped over it (``MAP_FIXED``) from that layer's file at the same offset. Private
    (``shared=False``) with ``Prot.WRITE`` gives a copy-on-write guest memory; shared
    and read-only gives a page source. One VMA per run: ``vm.max_map_count`` bounds how
    fragmented a chain can be mapped.

    Safety: the range is replaced piecewise with ``MAP_FIXED`` inside a mapping this
    function just made and still owns, so nothing else can live there.
    """
    fds = [os.open(layer.memory_path, os.O_RDONLY | os.O_CLOEXEC) for layer in chain.layers]
    try:
        whole = Mapping.of_fd(fds[0], chain.memory_bytes, shared=shared, prot=prot)
        try:
            for offset, length, i in chain.runs(owner):
                if i:
                    Mapping.of_fd(fds[i], length, offset=offset, shared=shared, prot=prot,
                                  at=whole.address + offset, replace=True).release()
        except BaseException:
            whole.close()
            raise
        return whole
    finally:
        for fd in fds:
            os.close(fd)


class ChainSource(PageSource):
    """Serve a chain's flattened bytes from one read-only mapping (see :func:`map_chain`).

    Pages whose owning layer has a hole there read as zeros and are reported by
    :meth:`zero_extents`, so the fault server maps zero pages for them.
    """

    def __init__(self, directory: str) -> None:
        self.chain = resolve_chain(directory)
        self.directory = directory
        owner = self.chain.flatten()
        self._zero = self._zeros(owner)
        self._map: Mapping | None = map_chain(self.chain, shared=True, prot=Prot.READ,
                                              owner=owner)

    def _zeros(self, owner: npt.NDArray[np.uint16]) -> Bits:
        """Pages whose owning layer's file has a hole there; the work is proportional to
        the changed pages (plus one pass over the bottom layer)."""
        zero = np.zeros(owner.size, dtype=bool)
        for i, layer in enumerate(self.chain.layers):
            if layer.doc is None:
                pages = np.flatnonzero(owner == 0)
            else:
                pages = np.flatnonzero(layer.doc.pages)
                pages = pages[owner[pages] == i]
            fd = os.open(layer.memory_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                extents = data_extents(fd, self.chain.memory_bytes)
            finally:
                os.close(fd)
            starts = np.array([o // PAGE_SIZE for o, _ in extents], dtype=np.int64)
            ends = np.array([-(-(o + n) // PAGE_SIZE) for o, n in extents], dtype=np.int64)
            k = np.searchsorted(ends, pages, side="right")
            inside = k < len(extents)
            data = np.zeros(pages.size, dtype=bool)
            data[inside] = starts[k[inside]] <= pages[inside]
            zero[pages[~data]] = True
        return zero

    @property
    def size(self) -> int:
        return self.chain.memory_bytes

    def describe(self) -> str:
        return f"{self.directory} (chain of {self.chain.depth} diff layers)"

    def _mapping(self) -> Mapping:
        if self._map is None:
            raise SnapshotFormatError(f"snapshot chain {self.directory} is closed")
        return self._map

    def address_of(self, offset: int, length: int) -> int | None:
        m = self._mapping()
        if offset < 0 or offset + length > m.length:
            return None
        return m.address + offset

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._mapping().read(offset, len(buf))

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        first, last = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        z = self._zero[first:last]
        if not z.any():
            return []
        edges = np.flatnonzero(np.diff(np.concatenate(([0], z.view(np.int8), [0]))))
        out = []
        for s, e in zip(edges[::2], edges[1::2], strict=True):
            a, b = max((first + int(s)) * PAGE_SIZE, offset), min((first + int(e)) * PAGE_SIZE,
                                                                     offset + length)
            out.append((a, b - a))
        return out

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
