"""Serve a pushed snapshot as a :class:`~pagein.snapshot.source.PageSource`.

A read needs the chunks that overlap it. Each chunk is looked up in the host cache
(memory, then disk), else fetched from the store on a thread pool; concurrent
requests for one chunk share a single fetch (single flight). A read spanning
several chunks starts all their fetches before waiting on the first. Every chunk
is verified against its content hash (:func:`~.chunker.decode_chunk`) before any of
its bytes are copied out, whether it came from the store or the disk cache.

A snapshot's working set, if one was pushed, is downloaded whole on request
(:meth:`ChunkedSource.working_set_path`) into ``CACHE/working-sets/`` and checked
there by the working-set file's own SHA-256 before its path is handed out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

from pagein.errors import IntegrityError, SnapshotFormatError, SourceError
from pagein.snapshot import workingset
from pagein.snapshot.source import PageSource, SourceStats
from pagein.snapshot.store.backend import Backend
from pagein.snapshot.store.cache import ChunkCache
from pagein.snapshot.store.chunker import decode_chunk
from pagein.snapshot.store.layout import chunk_key, working_set_key
from pagein.snapshot.store.manifest import Manifest

__all__ = ["ChunkedSource"]


class ChunkedSource(PageSource):
    """A snapshot's bytes from content-addressed chunks in a store, through a host cache.

    ``block_size`` is the chunk size: reading one byte fetches its whole chunk.
    ``read_into`` raises SourceError (missing chunk, store unreachable) or
    IntegrityError (chunk does not match its hash) and never fills with substitute
    bytes; chunks the manifest marks all-zero read as zeros and are reported by
    :meth:`zero_extents`. Thread-safe.
    """

    def __init__(self, backend: Backend, manifest: Manifest, cache: ChunkCache, *,
                 workers: int = 8, where: str | None = None,
                 owns_backend: bool = True) -> None:
        self._backend = backend
        self.manifest = manifest
        self.cache = cache
        self.block_size = manifest.chunk_size
        self._where = where or f"{backend.url}/{manifest.name}"
        self._owns_backend = owns_backend
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pagein-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[bytes]] = {}
        self._closed = False
        self._ws_tmpdir: str | None = None   # working-set download dir without a disk cache
        self.fetches = 0            # chunk objects fetched from the store
        self.bytes_fetched = 0      # their stored (compressed) bytes
        self._fetch_times = SourceStats()  # the fetch-latency histogram

    @property
    def size(self) -> int:
        return self.manifest.size_bytes

    def describe(self) -> str:
        return self._where

    # --- reading --------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the snapshot bytes at ``offset``; raise rather than return short.

        Raises SourceError (outside the snapshot, chunk missing, store unreachable)
        or IntegrityError (a chunk does not match its hash); ``buf`` is then untouched.

        Safety: writes only into ``buf``. If ``buf`` views memory registered with a
        userfaultfd served by this same process, the copy faults while holding the
        GIL and deadlocks: pass a buffer the fault server owns (docs/serve.md, "Library use").
        """
        view = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.size:
            raise SourceError(f"read 0x{offset:x}-0x{offset + length:x} is outside snapshot "
                              f"{self._where} (size 0x{self.size:x} bytes)")
        if length == 0:
            return
        cs = self.block_size
        first, last = offset // cs, (offset + length - 1) // cs
        # Start every fetch first so a read spanning chunks waits for the slowest
        # one, not for the sum of them.
        pending = [self._chunk(i) for i in range(first, last + 1)]
        # Resolve (fetch + verify) every chunk before copying any byte: on an error
        # the caller's buffer is untouched, not half-filled.
        try:
            parts = [p.result() if isinstance(p, Future) else p for p in pending]
        except CancelledError as e:
            raise SourceError(f"page source {self._where} was closed during a read") from e
        for i, data in zip(range(first, last + 1), parts, strict=True):
            lo = max(offset, i * cs)
            hi = min(offset + length, (i + 1) * cs)
            dst = view[lo - offset:hi - offset]
            if data is None:
                dst[:] = bytes(hi - lo)
            else:
                dst[:] = memoryview(data)[lo - i * cs:hi - i * cs]

    def _chunk(self, index: int) -> bytes | Future[bytes] | None:
        """Return chunk ``index``: None if all-zero, bytes if cached, else a pending fetch."""
        ref = self.manifest.chunks[index]
        if ref is None:
            return None
        data = self.cache.get_memory(ref.digest)
        if data is not None:
            return data
        with self._lock:
            fut = self._inflight.get(ref.digest)
            if fut is None:
                if self._closed:
                    raise SourceError(f"page source {self._where} is closed")
                fut = self._pool.submit(self._load, index, ref.digest)
                self._inflight[ref.digest] = fut
            return fut

    def _load(self, index: int, digest: str) -> bytes:
        """Fetch (disk cache, else store), verify and cache one chunk; runs on the pool."""
        try:
            length = self.manifest.chunk_length(index)
            key = chunk_key(digest)
            what = f"{index} ({key}) of snapshot {self._where}"
            data: bytes | None = None
            stored = self.cache.get_disk(digest)
            if stored is not None:
                try:
                    data = decode_chunk(stored, digest, length, f"{what} in the host cache")
                except IntegrityError:
                    # A damaged cache file is the cache's problem, not the snapshot's:
                    # drop it and fetch the real object.
                    self.cache.discard_disk(digest)
            if data is None:
                started = time.monotonic()
                stored = self._backend.get(key)
                took = time.monotonic() - started
                if stored is None:
                    raise SourceError(f"chunk {what} is missing from the store: it was "
                                      "deleted or never uploaded; re-push the snapshot")
                with self._lock:
                    self.fetches += 1
                    self.bytes_fetched += len(stored)
                    self._fetch_times.observe_fetch(took)
                data = decode_chunk(stored, digest, length, what)
                self.cache.put_disk(digest, stored)
            self.cache.put_memory(digest, data)
            return data
        finally:
            # The chunk is in the memory cache before it leaves _inflight, so a new
            # request finds one or the other (unless memory is too small to hold it,
            # which only costs a refetch).
            with self._lock:
                self._inflight.pop(digest, None)

    def stats(self) -> SourceStats:
        """The host cache's hits (this process's), the store fetches and their latency."""
        with self._lock:
            return SourceStats(
                cache_hits_memory=self.cache.hits_memory, cache_hits_disk=self.cache.hits_disk,
                fetches=self.fetches, fetched_bytes=self.bytes_fetched,
                cache_memory_bytes=self.cache.memory_used,
                fetch_seconds_sum=self._fetch_times.fetch_seconds_sum,
                fetch_buckets=list(self._fetch_times.fetch_buckets))

    # --- working set ----------------------------------------------------------------

    def working_set_path(self) -> str | None:
        """Return a local copy of the snapshot's pushed working set, or None if it has none.

        Looks the object up (one HEAD); a copy already in the disk cache under the same
        store size and time is reused, else it is downloaded to a temp name and renamed
        into place. Either way the file's own checksum is verified before its path is
        returned (a damaged cached copy is fetched again). Without a disk cache it goes
        to a temp directory removed on :meth:`close`. The caller still checks it against
        this snapshot with :func:`pagein.snapshot.workingset.load`. Raises SourceError
        (store failure) or IntegrityError/SnapshotFormatError (the stored file is bad).
        """
        key = working_set_key(self.manifest.name)
        info = self._backend.head(key)
        if info is None:
            return None
        tag = hashlib.sha256(f"{self._where}\0{info.size_bytes}\0{info.mtime}".encode())
        path = self._working_set_dir() / f"{tag.hexdigest()[:32]}.ws"
        what = f"the working set of {self._where} ({key})"
        if path.exists():
            try:
                _verify_working_set(str(path))
                return str(path)
            except (SnapshotFormatError, IntegrityError, SourceError):
                path.unlink(missing_ok=True)  # a damaged cache copy: fetch it again
        data = self._backend.get(key)
        if data is None:
            raise SourceError(f"{what} vanished from the store while being read: retry")
        tmp = path.parent / f".tmp.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            _verify_working_set(str(tmp))
            os.replace(tmp, path)
        except OSError as e:
            raise SourceError(f"cannot write {what} to {path.parent}: {e.strerror}; set "
                              "PAGEIN_CACHE_DIR to a writable directory") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return str(path)

    def _working_set_dir(self) -> Path:
        if self.cache.directory is not None:
            d = self.cache.directory / "working-sets"
            d.mkdir(exist_ok=True)
            return d
        with self._lock:
            if self._ws_tmpdir is None:
                self._ws_tmpdir = tempfile.mkdtemp(prefix="pagein-ws-")
            return Path(self._ws_tmpdir)

    # --- hints ----------------------------------------------------------------------

    def prefetch(self, offset: int, length: int) -> None:
        """Start fetching the chunks of the range in the background (errors surface on read)."""
        if length <= 0:
            return
        cs = self.block_size
        lo = max(offset, 0) // cs
        hi = min(offset + length, self.size) - 1
        for i in range(lo, hi // cs + 1 if hi >= 0 else lo):
            self._chunk(i)

    def zero_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Return the pieces of the range that lie in chunks pushed as all-zero."""
        cs = self.block_size
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        i = max(offset, 0) // cs
        while i * cs < end:
            if self.manifest.chunks[i] is None:
                lo, hi = max(offset, i * cs), min(end, (i + 1) * cs)
                if out and out[-1][0] + out[-1][1] == lo:
                    out[-1] = (out[-1][0], out[-1][1] + hi - lo)
                else:
                    out.append((lo, hi - lo))
            i += 1
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ws_tmpdir is not None:
            # A mapping of the working set outlives the unlink; the bytes go with it.
            shutil.rmtree(self._ws_tmpdir, ignore_errors=True)
        if self._owns_backend:
            self._backend.close()


def _verify_working_set(path: str) -> None:
    """Check format and SHA-256 of the working-set file at ``path`` (raise if bad)."""
    with workingset.load(path):
        pass
