"""push, pull, ls, rm and gc over a :class:`~.backend.Backend`.

Why gc is safe while pushes run (S3 has no locks and no conditional delete):

- A push writes ``pushes/NAME.UUID.json`` first, then lists the chunks the store
  already has, uploads the missing ones, writes the manifest, and only then deletes
  its marker.
- gc writes ``gc/UUID.json``, then lists chunks, then push markers, then manifests
  (in that order), and deletes a chunk only if no manifest names it, it is older than
  the grace period, and it is older than every live push marker (so nothing an
  unfinished push uploaded can go).
- What remains is a chunk a push found already present and reused: a gc that had
  listed markers before that push began may delete it. So after writing its
  manifest a push waits until every gc marker it sees is gone (those gcs have done
  all their deleting), then lists chunks again and re-uploads any it referenced that
  vanished. A gc that starts after the manifest exists sees the manifest.

Object times are the store's own (mtime / LastModified), never the client clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pagein.errors import IntegrityError, SourceError
from pagein.snapshot import workingset
from pagein.snapshot.source import PageSource
from pagein.snapshot.store.backend import Backend, ObjectInfo
from pagein.snapshot.store.cache import ChunkCache
from pagein.snapshot.store.chunker import decode_chunk, digest, encode_chunk
from pagein.snapshot.store.layout import (
    CHUNKS,
    GCS,
    PUSHES,
    WORKING_SETS,
    chunk_key,
    digest_of_key,
    host_tag,
    manifest_key,
    read_manifest,
    snapshot_names,
    working_set_key,
)
from pagein.snapshot.store.manifest import ChunkRef, Manifest, check_chunk_size, check_name
from pagein.snapshot.store.pushinput import PushInput
from pagein.snapshot.store.source import ChunkedSource

__all__ = ["GcStats", "Progress", "PullStats", "PushStats", "SnapshotInfo", "fetch_chunk", "gc",
           "list_snapshots", "pull", "push", "push_working_set", "remove", "verify"]

#: A push or gc marker not refreshed for this long is from a process that died.
MARKER_TTL_SECONDS = 600.0
MARKER_REFRESH_SECONDS = 60.0
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report: ``phase`` (listing, chunking, uploading, verifying, …), counts,
    and for the phases that move a file's bytes the bytes done of how many (0: not
    counted in bytes), from which a front end shows a rate and the time left."""

    phase: str
    done: int
    total: int
    done_bytes: int = 0
    total_bytes: int = 0


ProgressFn = Callable[[Progress], None]


def _nothing(_: Progress) -> None:
    pass


@dataclass(frozen=True, slots=True)
class PushStats:
    """What a push did; byte counts are file bytes in and store bytes written."""

    name: str
    chunks: int
    zero_chunks: int
    unique_chunks: int          # distinct non-zero chunks in this snapshot
    new_chunks: int             # of those, uploaded now (the rest were already stored)
    bytes_in: int               # size of the memory file
    unique_raw_bytes: int       # uncompressed bytes of the distinct non-zero chunks
    unique_stored_bytes: int    # their compressed size (what the snapshot costs alone)
    bytes_out: int              # compressed bytes actually uploaded by this push
    reuploaded: int             # chunks a concurrent gc removed and this push restored
    layers: int = 0             # pushed from a chain of diff layers: how many (with the full)

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw_bytes / self.unique_stored_bytes if self.unique_stored_bytes else 1.0

    @property
    def dedup_savings(self) -> float:
        """Fraction of this snapshot's stored bytes that the store already had."""
        if not self.unique_stored_bytes:
            return 0.0
        return 1.0 - self.bytes_out / self.unique_stored_bytes


@dataclass(frozen=True, slots=True)
class PullStats:
    name: str
    chunks: int
    zero_chunks: int
    bytes_fetched: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class GcStats:
    chunks_seen: int
    chunks_deleted: int
    bytes_freed: int
    kept_young: int             # unreferenced but inside the grace period / a live push
    stale_markers_removed: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    size_bytes: int
    chunk_size: int
    chunks: int
    zero_chunks: int
    stored_bytes: int
    created_unix: float
    working_set: bool = False   # a working-set file was pushed with it


class _Marker:
    """A "push/gc under way" object, rewritten every minute so that it stays live.

    Liveness is the object's store mtime; the store time of the *first* write is
    kept in the body (``started``), so refreshing does not move the start.
    """

    def __init__(self, backend: Backend, key: str, kind: str, name: str = "") -> None:
        self.backend = backend
        self.key = key
        self.kind = kind
        self.name = name
        self.started = 0.0
        self._last_put = 0.0

    def _put(self) -> None:
        body = {"kind": self.kind, "name": self.name, "by": host_tag(),
                "started": self.started, "client_time": time.time()}
        self.backend.put(self.key, json.dumps(body).encode())
        self._last_put = time.monotonic()

    def create(self) -> float:
        """Write the marker; return its store time (the store's "now")."""
        self._put()
        info = self.backend.head(self.key)
        if info is None:
            raise SourceError(f"store {self.backend.url} lost {self.key} right after writing "
                              "it: the store is not read-after-write consistent")
        self.started = info.mtime
        self._put()
        return info.mtime

    def keep_alive(self) -> None:
        if time.monotonic() - self._last_put > MARKER_REFRESH_SECONDS:
            self._put()

    def remove(self) -> None:
        self.backend.delete([self.key])


def _push_started(backend: Backend, info: ObjectInfo) -> float:
    """Return when a push began (store clock), from its marker's body, else its mtime."""
    data = backend.get(info.key)
    try:
        started = json.loads(data or b"{}").get("started")
    except (ValueError, AttributeError):
        started = None
    return float(started) if isinstance(started, int | float) and started > 0 else info.mtime


def push(backend: Backend, path: str | os.PathLike[str], name: str, *,
         chunk_size: int = 1 << 20, workers: int = 4, working_set: str | None = None,
         progress: ProgressFn = _nothing) -> PushStats:
    """Chunk, compress and upload the memory file at ``path`` as snapshot ``name``.

    ``path`` may be a diff snapshot layer's directory: the chain is pushed flattened
    (see :mod:`pagein.snapshot.store.pushinput`), and only chunks the store lacks
    (those with a page changed since the parent's push) are uploaded.

    Chunks already in the store are not uploaded again; the manifest is written only
    after every chunk it names is stored. ``working_set`` (a file written by ``pagein
    serve --record``) is checked against ``path`` before anything is uploaded and
    stored next to the manifest; without it, a working set left by an earlier push
    of ``name`` is deleted (it belonged to other bytes). Raises SourceError on store
    failure or an unreadable file, IntegrityError/SnapshotFormatError for a working
    set that is damaged or was recorded from another snapshot.
    """
    check_name(name)
    check_chunk_size(chunk_size)
    with PushInput(path) as data:
        return _push(backend, data, name, chunk_size, workers, working_set, progress)


def _push(backend: Backend, data: PushInput, name: str, chunk_size: int, workers: int,
          working_set: str | None, progress: ProgressFn) -> PushStats:
    path, size = data.path, data.size
    ws_data = None
    if working_set is not None:
        with data.page_source() as raw_source:
            ws_data = _checked_working_set(working_set, raw_source)
    marker = _Marker(backend, f"{PUSHES}{name}.{uuid.uuid4().hex}.json", "push", name)
    marker.create()
    try:
        progress(Progress("listing", 0, 0))
        existing = {d: o.size_bytes for o in backend.list(CHUNKS)
                    if (d := digest_of_key(o.key)) is not None}
        progress(Progress("listed", len(existing), len(existing)))
        refs, sizes, raw_lengths, counts = _upload_chunks(
            backend, data, size, chunk_size, existing, workers, progress, marker)
        manifest = Manifest(name, size, chunk_size,
                            tuple(None if d is None else ChunkRef(d, sizes[d]) for d in refs),
                            time.time(), data.layers)
        # Before the new manifest: a server must never pair it with the old working set.
        backend.delete([working_set_key(name)])
        backend.put(manifest_key(name), manifest.encode())
        progress(Progress("verifying", 0, len(sizes)))
        reuploaded = _settle_with_gc(backend, data, manifest, progress, marker)
        if ws_data is not None:
            backend.put(working_set_key(name), ws_data)
    except OSError as e:
        raise SourceError(f"reading memory file {os.fspath(path)} failed: {e}") from e
    finally:
        marker.remove()
    zero = sum(1 for d in refs if d is None)
    new_chunks, bytes_out = counts
    return PushStats(name, len(refs), zero, len(sizes), new_chunks, size,
                     sum(raw_lengths.values()), sum(sizes.values()), bytes_out, reuploaded,
                     len(data.layers))


_Uploaded = tuple[list[str | None], dict[str, int], dict[str, int], tuple[int, int]]


def _upload_chunks(backend: Backend, data_in: PushInput, size: int, chunk_size: int,
                   existing: dict[str, int], workers: int, progress: ProgressFn,
                   marker: _Marker) -> _Uploaded:
    """Read, hash and upload missing chunks.

    Return (digest per index, stored size per digest, raw size per digest,
    (new chunks, bytes uploaded)).
    """
    total = -(-size // chunk_size)
    refs: list[str | None] = []
    sizes: dict[str, int] = {}
    raw_lengths: dict[str, int] = {}
    pending: dict[str, Future[int]] = {}
    window: list[Future[int]] = []

    def upload(d: str, data: bytes) -> int:
        stored = encode_chunk(data)
        backend.put(chunk_key(d), stored)
        return len(stored)

    # The main thread reads and hashes (hashlib drops the GIL on big buffers); the
    # pool compresses and uploads. The window bounds memory to a few chunks per worker.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pagein-push") as pool:
        for raw in data_in.chunks(chunk_size):
            if raw.data is None:
                refs.append(None)
            else:
                d = digest(raw.data)
                refs.append(d)
                raw_lengths[d] = raw.length
                if d in existing:
                    sizes[d] = existing[d]
                elif d not in pending:
                    fut = pool.submit(upload, d, raw.data)
                    pending[d] = fut
                    window.append(fut)
            marker.keep_alive()
            while len(window) > workers * 2:
                window.pop(0).result()
            progress(Progress("uploading", raw.index + 1, total,
                              min(size, (raw.index + 1) * chunk_size), size))
        for d, fut in pending.items():
            sizes[d] = fut.result()
    bytes_out = sum(sizes[d] for d in pending)
    return refs, sizes, raw_lengths, (len(pending), bytes_out)


def _settle_with_gc(backend: Backend, data_in: PushInput, manifest: Manifest,
                    progress: ProgressFn, marker: _Marker) -> int:
    """Wait out running gcs, then restore any referenced chunk one of them deleted."""
    written = backend.head(manifest_key(manifest.name))
    now = written.mtime if written is not None else time.time()
    # A gc that began before our manifest existed may still delete a chunk we
    # reused; only when it is gone is the store's chunk list final for us. A gc
    # that starts later sees the manifest, so only the ones running now count.
    running = {m.key for m in backend.list(GCS) if m.mtime > now - MARKER_TTL_SECONDS}
    waited = 0
    started = time.monotonic()
    while running:
        progress(Progress("waiting for gc", waited, 0))
        time.sleep(min(0.02 * 2 ** min(waited, 4), 0.25))
        waited += 1
        marker.keep_alive()
        # Still there and refreshed recently (a dead gc's marker goes stale).
        horizon = now + (time.monotonic() - started) - MARKER_TTL_SECONDS
        running &= {m.key for m in backend.list(GCS) if m.mtime > horizon}
    present = {digest_of_key(o.key) for o in backend.list(CHUNKS)}
    first_index: dict[str, int] = {}
    for i, c in enumerate(manifest.chunks):
        if c is not None and c.digest not in present:
            first_index.setdefault(c.digest, i)
    if not first_index:
        return 0
    for d, i in first_index.items():
        data = data_in.read(i * manifest.chunk_size, manifest.chunk_length(i))
        if digest(data) != d:
            raise SourceError(f"memory file {data_in.path} changed during the push "
                              f"(chunk {i}); push it again from a stable copy")
        backend.put(chunk_key(d), encode_chunk(data))
    return len(first_index)


def fetch_chunk(backend: Backend, manifest: Manifest, index: int, where: str) -> bytes:
    """Fetch chunk ``index`` of ``manifest`` and return its verified uncompressed bytes.

    Raises SourceError when the object is missing and IntegrityError when it does not
    match its hash — never returns unverified or substitute bytes.
    """
    ref = manifest.chunks[index]
    if ref is None:
        return bytes(manifest.chunk_length(index))
    key = chunk_key(ref.digest)
    stored = backend.get(key)
    what = f"{index} ({key}) of snapshot {where}"
    if stored is None:
        raise SourceError(f"chunk {what} is missing from the store: it was deleted or never "
                          "uploaded; re-push the snapshot (and check gc --grace)")
    return decode_chunk(stored, ref.digest, manifest.chunk_length(index), what)


def pull(backend: Backend, name: str, out: str | os.PathLike[str], *, workers: int = 8,
         progress: ProgressFn = _nothing) -> PullStats:
    """Rebuild snapshot ``name`` as a (sparse) memory file at ``out``, verifying every chunk."""
    manifest = read_manifest(backend, name)
    where = f"{backend.url}/{name}"
    tmp = f"{os.fspath(out)}.part.{os.getpid()}"
    fetched = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, manifest.size_bytes)  # zero chunks stay holes
        indices = [i for i, c in enumerate(manifest.chunks) if c is not None]
        total_bytes = sum(manifest.chunk_length(i) for i in indices)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pagein-pull") as pool:
            results = pool.map(lambda i: (i, fetch_chunk(backend, manifest, i, where)), indices)
            for n, (i, data) in enumerate(results):
                os.pwrite(fd, data, i * manifest.chunk_size)
                fetched += len(data)
                progress(Progress("downloading", n + 1, len(indices), fetched, total_bytes))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    zero = sum(1 for c in manifest.chunks if c is None)
    return PullStats(name, len(manifest.chunks), zero, fetched, manifest.size_bytes)


def _checked_working_set(path: str, source: PageSource) -> bytes:
    """Return the bytes of working-set file ``path`` once :func:`workingset.load` accepts
    it for ``source`` (format, checksum, memory size, sampled pages equal)."""
    with workingset.load(path, source):
        pass
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"cannot read working-set file {path}: {e.strerror}") from e


def push_working_set(backend: Backend, name: str, path: str) -> int:
    """Store working-set file ``path`` with snapshot ``name``, replacing any earlier one.

    The file is checked against the stored snapshot's bytes first (the sampled pages
    are fetched from the store). Returns the bytes stored. Raises SourceError (no such
    snapshot, store failure) or IntegrityError/SnapshotFormatError (damaged file,
    recorded from another snapshot).
    """
    manifest = read_manifest(backend, name)
    with ChunkedSource(backend, manifest, ChunkCache(None), workers=4,
                       owns_backend=False) as source:
        data = _checked_working_set(path, source)
    backend.put(working_set_key(name), data)
    return len(data)


def list_snapshots(backend: Backend) -> list[SnapshotInfo]:
    """Return one row per snapshot in the store."""
    with_ws = {o.key for o in backend.list(WORKING_SETS)}
    rows = []
    for name in snapshot_names(backend):
        try:
            m = read_manifest(backend, name)
        except SourceError:  # removed between list and get
            continue
        rows.append(SnapshotInfo(m.name, m.size_bytes, m.chunk_size, len(m.chunks),
                                 sum(1 for c in m.chunks if c is None), m.stored_bytes,
                                 m.created_unix, working_set_key(m.name) in with_ws))
    return rows


def remove(backend: Backend, name: str) -> None:
    """Delete snapshot ``name``'s manifest and working set; its chunks go at the next gc."""
    key = manifest_key(name)
    if backend.head(key) is None:
        raise SourceError(f"no snapshot {name!r} in store {backend.url}: see "
                          f"'pagein store ls --store {backend.url}'")
    backend.delete([key, working_set_key(name)])


def gc(backend: Backend, *, grace_seconds: float = DEFAULT_GRACE_SECONDS,
       dry_run: bool = False, progress: ProgressFn = _nothing) -> GcStats:
    """Delete chunks no manifest references (see the module docstring for why it is safe).

    Raises IntegrityError/SnapshotFormatError (and deletes nothing) if any manifest
    cannot be read: a chunk must never go because its manifest was unreadable.
    """
    marker = _Marker(backend, f"{GCS}{uuid.uuid4().hex}.json", "gc")
    now = marker.create()
    try:
        progress(Progress("listing chunks", 0, 0))
        chunks = [(d, o) for o in backend.list(CHUNKS) if (d := digest_of_key(o.key))]
        marker.keep_alive()
        pushes = list(backend.list(PUSHES))
        live = [p for p in pushes if p.mtime > now - MARKER_TTL_SECONDS]
        stale = [p.key for p in pushes if p.mtime <= now - MARKER_TTL_SECONDS]
        referenced: set[str] = set()
        for name in snapshot_names(backend):
            try:
                referenced |= read_manifest(backend, name).referenced()
            except SourceError:  # removed between list and get: its chunks are free
                continue
            marker.keep_alive()
        cutoff = now - grace_seconds
        if live:
            cutoff = min(cutoff, min(_push_started(backend, p) for p in live))
        doomed = [(d, o) for d, o in chunks if d not in referenced and o.mtime < cutoff]
        young = sum(1 for d, o in chunks if d not in referenced and o.mtime >= cutoff)
        if not dry_run:
            for start in range(0, len(doomed), 500):
                marker.keep_alive()  # pushes wait for us only while our marker is fresh
                backend.delete([o.key for _, o in doomed[start:start + 500]])
                progress(Progress("deleting", min(start + 500, len(doomed)), len(doomed)))
            stale_gcs = [m.key for m in backend.list(GCS)
                         if m.mtime <= now - MARKER_TTL_SECONDS]
            backend.delete(stale + stale_gcs)
    finally:
        marker.remove()
    return GcStats(len(chunks), len(doomed), sum(o.size_bytes for _, o in doomed), young,
                   0 if dry_run else len(stale))


def verify(backend: Backend, name: str, *, workers: int = 8) -> list[int]:
    """Fetch and check every chunk of snapshot ``name``; return indices missing or corrupt."""
    manifest = read_manifest(backend, name)
    where = f"{backend.url}/{name}"

    def bad(index: int) -> bool:
        try:
            fetch_chunk(backend, manifest, index, where)
        except (SourceError, IntegrityError):
            return True
        return False

    indices = [i for i, c in enumerate(manifest.chunks) if c is not None]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pagein-verify") as pool:
        return [i for i, b in zip(indices, pool.map(bad, indices), strict=True) if b]
