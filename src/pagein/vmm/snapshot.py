"""VM snapshots on disk: a versioned, checksummed state file and a raw memory file.

A snapshot is a directory with two files:

* ``memory``: guest RAM in Firecracker's ``mem_file_path`` layout, the regions back to
  back with no header (see :mod:`pagein.snapshot.raw`). All-zero 1 MiB chunks are left
  as holes, so untouched guest memory costs no disk and is served as zero pages;
* ``vmstate``: everything else, laid out as::

      offset  size  field
      0       8     magic  b"PGVMSTAT"
      8       4     format version, u32 little-endian (this module writes and reads 1)
      12      4     flags, u32, 0
      16      8     body length in bytes, u64
      24      32    SHA-256 of the body
      56      ...   body: UTF-8 JSON object
                      vcpus[]        per vCPU: regs, sregs (the kernel's struct kvm_regs /
                                     kvm_sregs bytes), fpu, xsave, xcrs, events (raw kernel
                                     structs), all base64; mp_state; msrs [[index, value]]
                      active_vcpus   vCPUs still running at the snapshot (start only these)
                      console        output_bytes (console position), pending_input (b64)
                      memory         file name, file_bytes, sha256 (hex or null), and
                                     regions [{guest_phys, size, offset, page_size}], where
                                     offset is the region's offset in the memory file
                      workload       optional {name, args}: what the guest runs
                      layer          optional {file, sha256}: this is a diff layer, its
                                     pages and parent in that file (pagein.snapshot.chain)

:func:`load_snapshot` checks all of it before any guest runs and raises
:class:`~pagein.errors.SnapshotFormatError` (truncated, unknown version, a bad field,
a memory file of the wrong size) or :class:`~pagein.errors.IntegrityError` (checksum),
each naming the file and the field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pagein._abi import kvm as kabi
from pagein.errors import IntegrityError, SnapshotFormatError
from pagein.snapshot.chain import LAYER_FILE, encode_layer, file_sha256
from pagein.sys.kvm import Regs, Sregs, VcpuState
from pagein.sys.mapping import PAGE_SIZE
from pagein.vmm.layout import MAX_VCPUS

if TYPE_CHECKING:
    from pagein.vmm.machine import Machine
    from pagein.vmm.memory import GuestMemory

__all__ = ["FORMAT_VERSION", "MEMORY_FILE", "STATE_FILE", "MemoryRegion", "Snapshot",
           "encode_state", "load_snapshot", "read_state", "save_snapshot", "verify_memory",
           "write_memory"]

MAGIC = b"PGVMSTAT"
FORMAT_VERSION = 1
STATE_FILE = "vmstate"
MEMORY_FILE = "memory"
_HEADER = struct.Struct("<8sIIQ32s")
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_REGS_BYTES = len(bytes(kabi.kvm_regs()))
_SREGS_BYTES = len(bytes(kabi.kvm_sregs()))


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A guest RAM region: ``size`` bytes at ``guest_phys``, stored at ``offset`` in the
    memory file."""

    guest_phys: int
    size: int
    offset: int
    page_size: int = PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A loaded, checked snapshot: the state to put back and where the memory is."""

    directory: str
    vcpus: tuple[VcpuState, ...]
    active_vcpus: frozenset[int]
    console_output_bytes: int
    pending_input: bytes
    regions: tuple[MemoryRegion, ...]
    memory_bytes: int
    memory_sha256: str | None
    workload: tuple[str, tuple[int, ...]] | None = None
    layer_sha256: str | None = None   # a diff layer: SHA-256 of its ``layer`` file
    bytes_written: int = 0            # bytes save_snapshot wrote to the memory file, holes
                                      # not counted (0 when loaded)

    @property
    def memory_path(self) -> str:
        return os.path.join(self.directory, MEMORY_FILE)

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, STATE_FILE)


# --- writing -------------------------------------------------------------------------


def write_memory(memory: GuestMemory, path: str, *,
                 digest: bool = True) -> tuple[int, str | None, int]:
    """Write guest RAM to ``path`` as a raw memory file; return ``(file bytes, sha256 hex,
    bytes written)``: chunks that are all zero become holes and are not written.

    Guest memory is read with :meth:`~pagein.sys.mapping.Mapping.read` (GIL released),
    so memory that is still being filled lazily is faulted in through its handler,
    never read as zeros.
    """
    sha = hashlib.sha256() if digest else None
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for region in memory.regions:
            for off in range(0, region.size, _CHUNK):
                chunk = region.mapping.read(off, min(_CHUNK, region.size - off))
                if sha is not None:
                    sha.update(chunk)
                if chunk != _ZERO_CHUNK[: len(chunk)]:
                    os.pwrite(fd, chunk, offset + off)
                    written += len(chunk)
            offset += region.size
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset, None if sha is None else sha.hexdigest(), written


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _vcpu_doc(s: VcpuState) -> dict[str, Any]:
    return {"regs": _b64(bytes(s.regs.to_c())), "sregs": _b64(bytes(s.sregs.to_c())),
            "fpu": _b64(s.fpu), "xsave": _b64(s.xsave), "xcrs": _b64(s.xcrs),
            "events": _b64(s.events), "mp_state": s.mp_state,
            "msrs": [[i, v] for i, v in s.msrs]}


def encode_state(doc: dict[str, Any]) -> bytes:
    """Frame a state document: header (magic, version, length, SHA-256) + JSON body."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def save_snapshot(machine: Machine, directory: str, *,
                  workload: tuple[str, tuple[int, ...]] | None = None,
                  digest: bool = True, diff: bool = False) -> Snapshot:
    """Save a paused ``machine`` into ``directory`` (created if needed).

    The caller pauses the machine first (:meth:`Machine.pause`), so every vCPU is at an
    instruction boundary with no port I/O pending. Both files are written under
    temporary names and renamed, the state file last: a crash leaves the old snapshot
    or a complete new one, and a VM restored by mapping the old memory file keeps its
    (unlinked) pages. Raises ``RuntimeError`` if the machine is running and
    ``ValueError`` if its guest has ended.

    ``diff`` writes only the pages changed since ``machine.parent`` (the snapshot it was
    restored from or last snapshotted to) as a layer on it (docs/restore.md); it needs
    :meth:`Machine.enable_dirty_tracking`. Either way the snapshot becomes the parent.
    """
    if not machine.active_vcpus:
        raise ValueError("the guest has ended (no vCPU is running): there is nothing to "
                         "snapshot")
    if diff and (machine.dirty is None or machine.parent is None):
        raise ValueError("a diff snapshot needs a parent: this VM was not restored from a "
                         "snapshot nor snapshotted with dirty tracking on; take a full "
                         "snapshot first (without --diff)")
    states = machine.vcpu_states()
    os.makedirs(directory, exist_ok=True)
    changed = machine.dirty.take() if machine.dirty is not None else None
    try:
        snap = _save(machine, directory, states, workload, digest, changed if diff else None)
    except BaseException:
        if changed is not None and machine.dirty is not None:
            machine.dirty.give_back(changed)
        raise
    if machine.dirty is not None:
        machine.parent = (os.path.realpath(directory), file_sha256(snap.state_path))
    return snap


def _save(machine: Machine, directory: str, states: list[VcpuState],
          workload: tuple[str, tuple[int, ...]] | None, digest: bool,
          changed: npt.NDArray[np.bool_] | None) -> Snapshot:
    from pagein.vmm.layers import layer_doc, write_diff_memory

    mem_tmp = os.path.join(directory, f".{MEMORY_FILE}.tmp")
    layer_tmp = os.path.join(directory, f".{LAYER_FILE}.tmp")
    layer_sha: str | None = None
    if changed is None:
        size, sha, written = write_memory(machine.memory, mem_tmp, digest=digest)
    else:
        assert machine.parent is not None  # checked by save_snapshot
        written, data_sha, zero = write_diff_memory(machine.memory, changed, mem_tmp)
        size, sha = machine.memory.size, None
        layer = encode_layer(layer_doc(machine.parent, directory, size, changed, zero,
                                       data_sha))
        with open(layer_tmp, "wb") as f:
            f.write(layer)
            f.flush()
            os.fsync(f.fileno())
        layer_sha = hashlib.sha256(layer).hexdigest()
    regions, offset = [], 0
    for r in machine.memory.regions:
        regions.append(MemoryRegion(r.guest_phys, r.size, offset, r.mapping.page_size))
        offset += r.size
    snap = Snapshot(directory, tuple(states), machine.active_vcpus,
                    len(machine.console.output()), machine.console.pending_input(),
                    tuple(regions), size, sha, workload, layer_sha, written)
    doc: dict[str, Any] = {
        "vcpus": [_vcpu_doc(s) for s in states],
        "active_vcpus": sorted(snap.active_vcpus),
        "console": {"output_bytes": snap.console_output_bytes,
                    "pending_input": _b64(snap.pending_input)},
        "memory": {"file": MEMORY_FILE, "file_bytes": size, "sha256": sha,
                   "regions": [{"guest_phys": r.guest_phys, "size": r.size, "offset": r.offset,
                                "page_size": r.page_size} for r in regions]},
        "workload": None if workload is None else {"name": workload[0],
                                                    "args": list(workload[1])},
        "layer": None if layer_sha is None else {"file": LAYER_FILE, "sha256": layer_sha},
    }
    state_tmp = os.path.join(directory, f".{STATE_FILE}.tmp")
    with open(state_tmp, "wb") as f:
        f.write(encode_state(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(mem_tmp, snap.memory_path)
    layer_path = os.path.join(directory, LAYER_FILE)
    if layer_sha is not None:
        os.replace(layer_tmp, layer_path)
    else:  # a full snapshot over an old layer: its layer file must not outlive it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layer_path)
    os.replace(state_tmp, snap.state_path)
    return snap


# --- reading -------------------------------------------------------------------------


class _Doc:
    """Typed access to the JSON body; every error names the field and the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def bad(self, field: str, why: str) -> SnapshotFormatError:
        return SnapshotFormatError(f"snapshot state file {self.path}: field {field} {why}; "
                                   "take the snapshot again")

    def get(self, obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.bad(f"{where}.{key}".lstrip("."), "is missing")
        return obj[key]

    def uint(self, obj: Any, key: str, where: str, *, lo: int = 0) -> int:
        v = self.get(obj, key, where)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < 1 << 64:
            raise self.bad(f"{where}.{key}".lstrip("."), f"is {v!r}, not an integer >= {lo}")
        return v

    def blob(self, obj: Any, key: str, where: str, size: int | None = None) -> bytes:
        v = self.get(obj, key, where)
        try:
            data = base64.b64decode(v, validate=True) if isinstance(v, str) else None
        except binascii.Error:
            data = None
        if data is None:
            raise self.bad(f"{where}.{key}", "is not base64 text")
        if size is not None and len(data) != size:
            raise self.bad(f"{where}.{key}", f"holds {len(data)} bytes, expected {size} "
                                             "(the kernel struct's size)")
        return data


def _not_a_directory(path: str) -> None:
    """Raise the error for a snapshot path that is not a directory, naming what it is."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.exists(path):
        raise SnapshotFormatError(f"snapshot directory {path} does not exist: pass a directory "
                                  "written by `pagein vm snapshot`")
    if name in (MEMORY_FILE, STATE_FILE) and os.path.isfile(os.path.join(parent, STATE_FILE)):
        raise SnapshotFormatError(f"{path} is the snapshot's {name} file: pass the snapshot "
                                  f"directory {parent} itself")
    raise SnapshotFormatError(f"{path} is not a directory: pass a snapshot directory written "
                              "by `pagein vm snapshot`")


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SnapshotFormatError(f"no snapshot state file {path}: pass a directory "
                                  "written by `pagein vm snapshot`") from None
    if len(raw) < _HEADER.size:
        raise SnapshotFormatError(f"snapshot state file {path} is truncated: {len(raw)} bytes, "
                                  f"shorter than its {_HEADER.size}-byte header")
    magic, version, flags, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SnapshotFormatError(f"{path} is not a pagein VM state file (magic {magic!r}, "
                                  f"expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SnapshotFormatError(f"snapshot state file {path} has format version {version}, "
                                  f"this pagein reads version {FORMAT_VERSION} only: restore "
                                  "it with the pagein that wrote it")
    if flags:
        raise SnapshotFormatError(f"snapshot state file {path} sets header flags 0x{flags:x} "
                                  "that this pagein does not know: restore it with the pagein "
                                  "that wrote it")
    body = raw[_HEADER.size:]
    if len(body) != length:
        what = "truncated" if len(body) < length else "longer than its header says"
        raise SnapshotFormatError(f"snapshot state file {path} is {what}: the body has "
                                  f"{len(body)} bytes, the header says {length}")
    if hashlib.sha256(body).digest() != digest:
        raise IntegrityError(f"snapshot state file {path} is corrupted: the SHA-256 of its "
                             f"{length}-byte body does not match the header")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotFormatError(f"snapshot state file {path}: the body is not JSON ({e})") \
            from e
    if not isinstance(doc, dict):
        raise SnapshotFormatError(f"snapshot state file {path}: the body is not a JSON object")
    return doc


def _vcpu(d: _Doc, obj: Any, where: str) -> VcpuState:
    msrs = d.get(obj, "msrs", where)
    if not isinstance(msrs, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64 for x in m)
            for m in msrs):
        raise d.bad(f"{where}.msrs", "is not a list of [index, value] pairs of u64")
    regs = kabi.kvm_regs.from_buffer_copy(d.blob(obj, "regs", where, _REGS_BYTES))
    sregs = kabi.kvm_sregs.from_buffer_copy(d.blob(obj, "sregs", where, _SREGS_BYTES))
    return VcpuState(regs=Regs.from_c(regs), sregs=Sregs.from_c(sregs),
                     fpu=d.blob(obj, "fpu", where), xsave=d.blob(obj, "xsave", where),
                     xcrs=d.blob(obj, "xcrs", where), events=d.blob(obj, "events", where),
                     mp_state=d.uint(obj, "mp_state", where),
                     msrs=tuple((m[0], m[1]) for m in msrs))


def _regions(d: _Doc, mem: Any) -> tuple[MemoryRegion, ...]:
    raw = d.get(mem, "regions", "memory")
    if not isinstance(raw, list) or not raw:
        raise d.bad("memory.regions", "is not a non-empty list")
    out, offset = [], 0
    for i, obj in enumerate(raw):
        w = f"memory.regions[{i}]"
        r = MemoryRegion(d.uint(obj, "guest_phys", w), d.uint(obj, "size", w, lo=1),
                         d.uint(obj, "offset", w), d.uint(obj, "page_size", w, lo=1))
        if r.offset != offset:
            raise d.bad(f"{w}.offset", f"is {r.offset}, but regions are stored back to back "
                                       f"so it must be {offset}")
        if r.page_size not in (PAGE_SIZE, 2 << 20) or r.size % r.page_size:
            raise d.bad(f"{w}.size", f"is {r.size}, not a multiple of its page size "
                                     f"{r.page_size} (4096 or 2 MiB)")
        offset += r.size
        out.append(r)
    return tuple(out)


def load_snapshot(directory: str, *, check_memory: bool = True) -> Snapshot:
    """Read and check a snapshot directory; nothing is restored.

    Checks the state file (size, magic, version, SHA-256, every field) and that the
    memory file has exactly the size the state file records. Raises
    :class:`~pagein.errors.SnapshotFormatError` or :class:`~pagein.errors.IntegrityError`.
    """
    if not os.path.isdir(directory):
        _not_a_directory(directory)
    path = os.path.join(directory, STATE_FILE)
    doc = read_state(path)
    d = _Doc(path)
    raw_vcpus = d.get(doc, "vcpus", "")
    if not isinstance(raw_vcpus, list) or not raw_vcpus:
        raise d.bad("vcpus", "is not a non-empty list")
    if len(raw_vcpus) > MAX_VCPUS:
        raise SnapshotFormatError(
            f"snapshot state file {path} holds {len(raw_vcpus)} vCPUs; pagein's VMM runs at "
            f"most {MAX_VCPUS}: restore it with the VMM that took it")
    vcpus = tuple(_vcpu(d, v, f"vcpus[{i}]") for i, v in enumerate(raw_vcpus))
    active = d.get(doc, "active_vcpus", "")
    if not isinstance(active, list) or not active or not all(
            isinstance(a, int) and 0 <= a < len(vcpus) for a in active):
        raise d.bad("active_vcpus", f"is {active!r}, not a non-empty list of vCPU ids below "
                                    f"{len(vcpus)}")
    console = d.get(doc, "console", "")
    mem = d.get(doc, "memory", "")
    regions = _regions(d, mem)
    file_bytes = d.uint(mem, "file_bytes", "memory")
    if file_bytes != sum(r.size for r in regions):
        raise d.bad("memory.file_bytes", f"is {file_bytes}, not the sum of the region sizes")
    sha = mem.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise d.bad("memory.sha256", "is not a SHA-256 in hex")
    workload = doc.get("workload")
    wl = None
    if workload is not None:
        args = workload.get("args") if isinstance(workload, dict) else None
        if not isinstance(workload, dict) or not isinstance(workload.get("name"), str) or \
                not isinstance(args, list) or not all(
                    isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise d.bad("workload", "is not {name: text, args: [integers]} or null")
        wl = (workload["name"], tuple(args))
    layer = doc.get("layer")
    if layer is not None and not (isinstance(layer, dict) and layer.get("file") == LAYER_FILE
                                  and isinstance(layer.get("sha256"), str)
                                  and len(layer["sha256"]) == 64):
        raise d.bad("layer", f'is not null or {{"file": "{LAYER_FILE}", "sha256": hex}}')
    snap = Snapshot(directory, vcpus, frozenset(active),
                    d.uint(console, "output_bytes", "console"),
                    d.blob(console, "pending_input", "console"), regions, file_bytes, sha, wl,
                    None if layer is None else layer["sha256"])
    if check_memory:
        check_memory_file(snap)
    return snap


def check_memory_file(snap: Snapshot) -> None:
    """Refuse a memory file that is missing or not exactly the recorded size."""
    try:
        st = os.stat(snap.memory_path)
    except FileNotFoundError:
        raise SnapshotFormatError(f"snapshot memory file {snap.memory_path} is missing: the "
                                  "snapshot directory is incomplete") from None
    if stat.S_ISDIR(st.st_mode):
        raise SnapshotFormatError(f"snapshot memory file {snap.memory_path} is a directory, "
                                  "not the memory file `pagein vm snapshot` writes")
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotFormatError(f"snapshot memory file {snap.memory_path} is not a regular "
                                  "file: it must be the memory file `pagein vm snapshot` writes")
    size = st.st_size
    if size != snap.memory_bytes:
        what = "truncated" if size < snap.memory_bytes else "larger than recorded"
        raise SnapshotFormatError(
            f"snapshot memory file {snap.memory_path} is {what}: {size} bytes, the state file "
            f"records {snap.memory_bytes} (regions 0x0-0x{snap.memory_bytes:x})")


def verify_memory(snap: Snapshot) -> None:
    """Hash the whole memory file and compare with the recorded SHA-256 (reads it all).

    Raises :class:`~pagein.errors.IntegrityError` on a mismatch and
    :class:`~pagein.errors.SnapshotFormatError` when no digest was recorded.
    """
    if snap.memory_sha256 is None:
        raise SnapshotFormatError(f"snapshot {snap.directory} recorded no memory digest: it "
                                  "was taken without one, so its memory cannot be verified")
    sha = hashlib.sha256()
    with open(snap.memory_path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK * 8):
            sha.update(chunk)
    if sha.hexdigest() != snap.memory_sha256:
        raise IntegrityError(f"snapshot memory file {snap.memory_path} is corrupted: its "
                             "SHA-256 does not match the one in the state file")
