"""Layered snapshots: a diff layer holds only the pages that changed since its parent.

A layer is a snapshot directory whose ``memory`` file has the full size of guest RAM
but holds data only at the pages that changed (everything else is a hole), plus a
``layer`` file naming those pages and the parent::

    offset  size  field
    0       8     magic  b"PGLAYER1"
    8       4     format version, u32 little-endian (2)
    12      4     flags, u32, 0
    16      8     body length in bytes, u64
    24      32    SHA-256 of the body
    56      ...   body: UTF-8 JSON object
                    parent         {path: the parent directory, relative to this one,
                                    state_sha256: SHA-256 of the parent's whole state file,
                                    layer_sha256: SHA-256 of the parent's layer file, or
                                    null when the parent is a full snapshot}
                    depth          diff layers from the full snapshot up to this one (>= 1)
                    memory_bytes   size of the memory file (equal in every layer)
                    pages          bitmap, one bit per 4 KiB page of the memory file
                                   (bit i = byte i // 8, bit i % 8), zlib-compressed
                                   (mostly zeros: a few hundred bytes), base64
                    data_sha256    SHA-256 of the changed pages' bytes, in page order
                    index          {runs, data}: the chain up to this layer flattened
                                   (pagein.snapshot.chainindex), written with the layer

The bottom of a chain is a full snapshot (no ``layer`` file). :func:`resolve_chain`
walks from the top to the bottom and refuses a missing, replaced or reordered parent,
a loop, or a depth above :data:`MAX_DEPTH`, each time naming the layer. Every link is a
digest of metadata: a layer's file records its parent's state file and layer file by
SHA-256, so the walk hashes a few KiB per layer and never rehashes page data (that is
``--verify-memory``). The top layer's recorded index is the chain flattened, so opening
reads one index however deep the chain is. :func:`map_chain` maps every run of pages
from its owning layer's file into one contiguous range, so a reader (the fault core, a
file restore) does one lookup and one copy per page whatever the depth: the kernel's
page tables are the index. A chain too fragmented for ``vm.max_map_count`` is read
with ``pread`` instead (:class:`ChainReader`).
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
from pagein.errors import IntegrityError, SnapshotFormatError, Unavailable
from pagein.snapshot.chainindex import ZERO, ChainIndex
from pagein.snapshot.raw import data_extents
from pagein.snapshot.source import PageSource
from pagein.sys.mapping import PAGE_SIZE, Mapping, map_count, max_map_count

__all__ = ["LAYER_FILE", "MAX_DEPTH", "MEMORY_FILE", "STATE_FILE", "Chain", "ChainReader",
           "ChainSource", "Layer", "LayerDoc", "check_map_room", "encode_layer", "file_sha256",
           "full_index", "map_chain", "pack_pages", "parse_layer", "read_layer",
           "resolve_chain"]

LAYER_FILE = "layer"
STATE_FILE = "vmstate"
MEMORY_FILE = "memory"
MAGIC = b"PGLAYER1"
VERSION = 2
MAX_DEPTH = ZERO - 1         # owners are u16 (one value means zeros): squash deeper chains
_HEADER = struct.Struct("<8sIIQ32s")
_MAX_BODY = 64 << 20          # a bitmap of 64 GiB of RAM is 2 MiB; anything larger is garbage
_MAP_SLACK = 4096             # mappings left for the rest of the process (guest memory, threads)
Bits = npt.NDArray[np.bool_]


def file_sha256(path: str) -> str:
    """SHA-256 of a whole (small) file in hex; raises FileNotFoundError."""
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def pack_pages(pages: Bits) -> str:
    """The ``pages`` field: a page bitmap packed, zlib-compressed, base64."""
    return base64.b64encode(zlib.compress(
        np.packbits(pages, bitorder="little").tobytes(), 1)).decode()


@dataclass(frozen=True, slots=True)
class LayerDoc:
    """The decoded ``layer`` file of one diff layer.

    The page bitmap and the index stay encoded until asked for (:meth:`changed_pages`,
    :meth:`chain_index`): opening a chain decodes only the top layer's index.
    """

    parent_path: str          # as recorded: relative to the layer's directory
    parent_state_sha256: str
    parent_layer_sha256: str | None   # None: the parent is a full snapshot
    depth: int
    memory_bytes: int
    pages_text: str           # the encoded bitmap (pack_pages)
    data_sha256: str
    index_runs: int
    index_text: str           # the encoded ChainIndex
    path: str = ""            # the file it was read from, for messages

    @property
    def npages(self) -> int:
        return self.memory_bytes // PAGE_SIZE

    def changed_pages(self) -> Bits:
        """One bool per page of the memory file: the pages this layer holds."""
        want = -(-self.npages // 8)
        try:
            inflate = zlib.decompressobj()
            # Bounded: a body that inflates past the bitmap's size is refused, not expanded.
            packed = inflate.decompress(base64.b64decode(self.pages_text, validate=True),
                                        want + 1)
            complete = inflate.eof and not inflate.unconsumed_tail
        except (binascii.Error, TypeError, ValueError, zlib.error):
            raise _bad(self.path, "field pages is not base64 of a zlib stream") from None
        if len(packed) != want or not complete:
            raise _bad(self.path, f"field pages holds {len(packed)}{'' if complete else '+'} "
                                  f"bytes, {want} expected for {self.npages} pages")
        return np.unpackbits(np.frombuffer(packed, np.uint8), count=self.npages,
                             bitorder="little").view(bool)

    def chain_index(self) -> ChainIndex:
        """The chain up to this layer, flattened when the layer was written."""
        try:
            index = ChainIndex.decode(self.index_text, self.index_runs, self.npages)
        except ValueError as e:
            raise _bad(self.path, f"field {e}") from None
        if index.max_owner() > self.depth:
            raise _bad(self.path, f"field index names layer {index.max_owner()} of a chain "
                                  f"{self.depth} deep")
        return index


def encode_layer(doc: LayerDoc) -> bytes:
    """Frame a layer document: header (magic, version, length, SHA-256) + JSON body."""
    body = json.dumps({
        "parent": {"path": doc.parent_path, "state_sha256": doc.parent_state_sha256,
                   "layer_sha256": doc.parent_layer_sha256},
        "depth": doc.depth,
        "memory_bytes": doc.memory_bytes,
        "pages": doc.pages_text,
        "data_sha256": doc.data_sha256,
        "index": {"runs": doc.index_runs, "data": doc.index_text}},
        separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def _bad(path: str, why: str) -> SnapshotFormatError:
    return SnapshotFormatError(f"snapshot layer file {path} {why}; take the diff snapshot again")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def read_layer(path: str) -> LayerDoc:
    """Read and check one ``layer`` file; every error names the file and the field."""
    with open(path, "rb") as f:
        return parse_layer(path, f.read(_HEADER.size + _MAX_BODY + 1))


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_layer(path: str, raw: bytes) -> LayerDoc:
    """Check the bytes of the layer file ``path``; the bitmap and index stay encoded."""
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
        parent, size, depth, index = obj["parent"], obj["memory_bytes"], obj["depth"], \
            obj["index"]
        ppath, psha, plsha = parent["path"], parent["state_sha256"], parent["layer_sha256"]
        pages, dsha, runs, itext = obj["pages"], obj["data_sha256"], index["runs"], \
            index["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(path, f"has a malformed body (missing or wrong field {e})") from None
    if not isinstance(ppath, str) or not ppath or "\0" in ppath:
        raise _bad(path, "field parent.path is not a directory path")
    if not _hex64(psha) or not _hex64(dsha) or not (plsha is None or _hex64(plsha)):
        raise _bad(path, "field parent.state_sha256, parent.layer_sha256 or data_sha256 is "
                         "not a SHA-256 in hex")
    if not _uint(size) or size == 0 or size % PAGE_SIZE:
        raise _bad(path, f"field memory_bytes is {size!r}, not a positive multiple of 4096")
    if not _uint(depth) or not 1 <= depth <= MAX_DEPTH:
        raise _bad(path, f"field depth is {depth!r}, not in 1..{MAX_DEPTH}")
    if not isinstance(pages, str) or not isinstance(itext, str) or not _uint(runs):
        raise _bad(path, "field pages, index.data or index.runs has the wrong type")
    return LayerDoc(ppath, psha, plsha, depth, size, pages, dsha, runs, itext, path)


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of a resolved chain: its directory and (for a diff) its layer file."""

    directory: str
    doc: LayerDoc | None      # None: the full snapshot at the bottom

    @property
    def memory_path(self) -> str:
        return os.path.join(self.directory, MEMORY_FILE)


@dataclass(frozen=True, slots=True)
class Chain:
    """Layers bottom (full snapshot) first, top (the one restored) last, and the index
    of the whole chain flattened (the top layer's, or the full snapshot's own)."""

    layers: tuple[Layer, ...]
    memory_bytes: int
    index: ChainIndex
    top_layer_sha256: str | None = None   # of the bytes the index was read from

    @property
    def depth(self) -> int:
        """Number of diff layers above the full snapshot."""
        return len(self.layers) - 1

    @property
    def top(self) -> str:
        return self.layers[-1].directory

    def runs(self) -> list[tuple[int, int, int]]:
        """``(offset, length, layer)`` runs of pages owned by one layer, in file order
        (layer :data:`~pagein.snapshot.chainindex.ZERO`: pages that read as zeros)."""
        return self.index.runs()


def _parent_of(here: str, doc: LayerDoc) -> tuple[str, LayerDoc | None]:
    """The parent directory of the layer in ``here`` and its layer file, each checked
    against the digests ``doc`` recorded (a few KiB hashed, no page data)."""
    parent = os.path.realpath(os.path.join(here, doc.parent_path))
    try:
        sha = file_sha256(os.path.join(parent, STATE_FILE))
    except (FileNotFoundError, NotADirectoryError):
        raise SnapshotFormatError(f"snapshot layer {here}: its parent {parent} is missing "
                                  f"(no {STATE_FILE} there); restore needs every layer "
                                  "of the chain") from None
    if sha != doc.parent_state_sha256:
        raise IntegrityError(f"snapshot layer {here}: its parent {parent} is not the "
                             "snapshot it was taken on (the parent's state file changed: "
                             "altered, replaced, or layers reordered)")
    if doc.parent_layer_sha256 is None:
        if doc.depth != 1:
            raise _bad(doc.path, f"field depth is {doc.depth} on a full snapshot (1 expected)")
        return parent, None
    lpath = os.path.join(parent, LAYER_FILE)
    try:
        with open(lpath, "rb") as f:
            raw = f.read(_HEADER.size + _MAX_BODY + 1)
    except FileNotFoundError:
        raise SnapshotFormatError(f"snapshot layer {here}: its parent {parent} has lost its "
                                  f"{LAYER_FILE} file; restore needs every layer of the "
                                  "chain") from None
    if hashlib.sha256(raw).hexdigest() != doc.parent_layer_sha256:
        raise IntegrityError(f"snapshot layer {here}: its parent's layer file {lpath} is not "
                             "the one it was taken on (altered or replaced)")
    pdoc = parse_layer(lpath, raw)
    if pdoc.depth != doc.depth - 1 or pdoc.memory_bytes != doc.memory_bytes:
        raise SnapshotFormatError(f"snapshot layer {here} (depth {doc.depth}, "
                                  f"{doc.memory_bytes} bytes) does not sit on its parent "
                                  f"{parent} (depth {pdoc.depth}, {pdoc.memory_bytes} bytes)")
    return parent, pdoc


def resolve_chain(directory: str) -> Chain:
    """Walk from the layer in ``directory`` down to its full snapshot; check every link.

    Raises :class:`~pagein.errors.SnapshotFormatError` for a missing parent, a loop, a
    chain deeper than :data:`MAX_DEPTH` or layers of different sizes, and
    :class:`~pagein.errors.IntegrityError` when a parent's state or layer file is not the
    one the layer above recorded (altered, replaced, or layers put in another order).
    The work per layer is hashing its two small files: no bitmap is merged.
    """
    here = os.path.realpath(directory)
    lpath = os.path.join(here, LAYER_FILE)
    doc, top_sha = None, None
    if os.path.exists(lpath):
        with open(lpath, "rb") as f:
            raw = f.read(_HEADER.size + _MAX_BODY + 1)
        doc, top_sha = parse_layer(lpath, raw), hashlib.sha256(raw).hexdigest()
    top = doc
    layers: list[Layer] = []
    seen: set[str] = set()
    while True:
        if here in seen:
            raise SnapshotFormatError(f"snapshot chain of {directory} loops back to layer "
                                      f"{here}: a layer cannot be its own ancestor")
        seen.add(here)
        layers.append(Layer(here, doc))
        if doc is None:
            break
        here, doc = _parent_of(here, doc)
    layers.reverse()
    base = layers[0].memory_path
    try:
        base_size = os.stat(base).st_size
    except FileNotFoundError:
        raise SnapshotFormatError(f"snapshot memory file {base} is missing: the snapshot "
                                  "directory is incomplete") from None
    size = top.memory_bytes if top is not None else base_size
    if base_size != size:
        raise SnapshotFormatError(f"snapshot {layers[0].directory} has a {base_size}-byte "
                                  f"memory file, its diff layers {size}: not one VM's chain")
    if size == 0 or size % PAGE_SIZE:
        raise SnapshotFormatError(f"snapshot memory file {base} has {size} bytes, not a "
                                  "positive multiple of 4096")
    return Chain(tuple(layers), size, top.chain_index() if top is not None
                 else full_index(base, size), top_sha)


def full_index(memory_path: str, size: int) -> ChainIndex:
    """The index of a full snapshot alone: its data owned by layer 0, its holes zeros."""
    fd = os.open(memory_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return ChainIndex.of_full(size // PAGE_SIZE, data_extents(fd, size))
    finally:
        os.close(fd)


def check_map_room(chain: Chain, remedy: str) -> None:
    """Refuse to map ``chain`` when its runs would push this process past
    ``vm.max_map_count`` (an ``mmap`` there fails with ENOMEM, half-way through).

    Raises :class:`~pagein.errors.Unavailable` naming the limit, the number of mappings
    needed and ``remedy`` (what else the caller can do).
    """
    need, used, limit = len(chain.index), map_count(), max_map_count()
    if need + used + _MAP_SLACK > limit:
        raise Unavailable(
            f"snapshot chain {chain.top} needs {need} memory mappings (one per run of pages "
            f"from one layer) and this process has {used}, more than vm.max_map_count "
            f"{limit} allows with {_MAP_SLACK} to spare: raise it (sysctl -w "
            f"vm.max_map_count={need + used + 2 * _MAP_SLACK}), squash the chain (pagein "
            f"snapshot squash){remedy}")


def map_chain(chain: Chain, *, shared: bool, prot: Prot, remedy: str = "") -> Mapping:
    """Map the flattened chain as one range: offset ``o`` reads the top-most layer's page.

    The bottom memory file is mapped whole, then every run owned by a diff layer is
    mapped over it (``MAP_FIXED``) from that layer's file at the same offset, and every
    run of zeros from anonymous memory. Private (``shared=False``) with ``Prot.WRITE``
    gives a copy-on-write guest memory; shared and read-only gives a page source. One
    mapping per run: :func:`check_map_room` refuses a chain too fragmented for
    ``vm.max_map_count`` first.

    Safety: the range is replaced piecewise with ``MAP_FIXED`` inside a mapping this
    function just made and still owns, so nothing else can live there.
    """
    check_map_room(chain, remedy)
    fds = _open_owners(chain)
    try:
        whole = Mapping.of_fd(fds[0], chain.memory_bytes, shared=shared, prot=prot)
        try:
            for offset, length, i in chain.runs():
                at = whole.address + offset
                if i == ZERO:
                    Mapping.anonymous(length, prot=prot, at=at, replace=True).release()
                elif i:
                    Mapping.of_fd(fds[i], length, offset=offset, shared=shared, prot=prot,
                                  at=at, replace=True).release()
        except BaseException:
            whole.close()
            raise
        return whole
    finally:
        for fd in fds.values():
            os.close(fd)


def _open_owners(chain: Chain) -> dict[int, int]:
    """Open the memory files of the bottom layer and of every layer that owns a run (a
    deep chain's pages mostly belong to a few layers); returns fds by layer number."""
    owners = {0, *(int(o) for o in np.unique(chain.index.owners) if o != ZERO)}
    fds: dict[int, int] = {}
    try:
        for i in sorted(owners):
            fds[i] = os.open(chain.layers[i].memory_path, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


class ChainReader:
    """Read the flattened chain with ``pread`` from each owning layer's file: no mapping,
    so no ``vm.max_map_count`` limit; one index lookup per run read. Thread-safe."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._fds = _open_owners(chain)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the flattened bytes at ``offset``; raises
        :class:`~pagein.errors.SnapshotFormatError` when a layer's file ends early."""
        index, pos, end = self.chain.index, offset, offset + len(buf)
        if offset < 0 or end > self.chain.memory_bytes:
            raise SnapshotFormatError(f"read 0x{offset:x}-0x{end:x} is outside snapshot chain "
                                      f"{self.chain.top} ({self.chain.memory_bytes} bytes)")
        run = index.run_of(offset)
        while pos < end:
            stop = min(index.run_end(run), end)
            owner = int(index.owners[run])
            piece = buf[pos - offset: stop - offset]
            if owner == ZERO:
                piece[:] = bytes(stop - pos)
            else:
                done = 0
                while done < len(piece):
                    n = os.preadv(self._fds[owner], [piece[done:]], pos + done)
                    if n <= 0:
                        raise SnapshotFormatError(
                            f"snapshot memory file {self.chain.layers[owner].memory_path} "
                            f"ends at byte {pos + done}, before the page its chain reads")
                    done += n
            pos, run = stop, run + 1

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class ChainSource(PageSource):
    """Serve a chain's flattened bytes from one read-only mapping (see :func:`map_chain`),
    or with ``pread`` (:class:`ChainReader`) when the chain is too fragmented for
    ``vm.max_map_count``; then the fault server copies through a buffer.

    Pages that read as zeros are reported by :meth:`zero_extents`, so the fault server
    maps zero pages for them.
    """

    def __init__(self, directory: str) -> None:
        self.chain = resolve_chain(directory)
        self.directory = directory
        #: SHA-256 of the top layer file, which binds the chain (None: a full snapshot).
        self.top_layer_sha256 = self.chain.top_layer_sha256
        self._map: Mapping | None = None
        self._reader: ChainReader | None = None
        try:
            self._map = map_chain(self.chain, shared=True, prot=Prot.READ)
        except Unavailable:
            self._reader = ChainReader(self.chain)

    @property
    def mapped(self) -> bool:
        """Whether the chain is served from one mapping (False: read with ``pread``)."""
        return self._map is not None

    @property
    def size(self) -> int:
        return self.chain.memory_bytes

    def describe(self) -> str:
        how = "" if self._reader is None else (
            f", read with pread: its {len(self.chain.index)} runs exceed vm.max_map_count")
        return f"{self.directory} (chain of {self.chain.depth} diff layers{how})"

    def _closed(self) -> SnapshotFormatError:
        return SnapshotFormatError(f"snapshot chain {self.directory} is closed")

    def address_of(self, offset: int, length: int) -> int | None:
        if self._map is None:
            if self._reader is None:
                raise self._closed()
            return None
        if offset < 0 or offset + length > self._map.length:
            return None
        return self._map.address + offset

    def read_into(self, offset: int, buf: memoryview) -> None:
        if self._map is not None:
            buf[:] = self._map.read(offset, len(buf))
        elif self._reader is not None:
            self._reader.read_into(offset, buf)
        else:
            raise self._closed()

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        index, end = self.chain.index, min(offset + length, self.size)
        offset = max(offset, 0)
        if end <= offset:
            return []
        first, last = index.run_of(offset), index.run_of(end - 1) + 1
        sel = np.flatnonzero(index.owners[first:last] == ZERO) + first
        nxt = np.minimum(sel + 1, len(index) - 1)
        ends = np.where(sel + 1 < len(index), index.starts[nxt], index.npages) * PAGE_SIZE
        starts = np.maximum(index.starts[sel] * PAGE_SIZE, offset)
        return [(int(a), int(b) - int(a)) for a, b in
                zip(starts, np.minimum(ends, end), strict=True)]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
