"""The host's chunk cache: an in-memory LRU over a disk directory, both size-bounded.

Chunks are content-addressed, so one cache serves every snapshot, store and VM on
the host: a base image's chunks fetched for the first VM are local for the next.

- Memory: verified, uncompressed chunks, least recently used evicted past
  ``memory_bytes``. One :class:`ChunkCache` per cache directory per process
  (:meth:`ChunkCache.shared`), so several sources in one server share it.
- Disk: the stored (compressed) objects as fetched, ``DIR/ab/abcd….zst``. Several
  processes may use one directory at once: a file is written to a temp name and
  renamed into place, so a reader sees nothing or the whole object; a file evicted
  by another process just reads as a miss. Hits refresh the file's mtime, and the
  process that notices the directory over ``disk_bytes`` deletes the oldest files.
  Bytes read from disk are verified again by the caller, exactly like a fetch: a
  damaged cache file costs a refetch, never wrong bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

__all__ = ["ChunkCache", "default_cache_dir"]

DEFAULT_MEMORY_BYTES = 256 << 20
DEFAULT_DISK_BYTES = 8 << 30
_TMP_MAX_AGE_SECONDS = 3600.0


def default_cache_dir() -> Path:
    """Return ``$PAGEIN_CACHE_DIR``, else /var/cache/pagein/chunks as root, else ~/.cache."""
    env = os.environ.get("PAGEIN_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/pagein/chunks")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "pagein" / "chunks"


class ChunkCache:
    """Verified chunks in memory, stored chunk objects on disk; thread-safe."""

    _shared: ClassVar[dict[tuple[str, int, int], ChunkCache]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str | os.PathLike[str] | None, *,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 disk_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_used = 0
        self._disk_estimate: int | None = None  # None: not scanned yet
        self.hits_memory = 0
        self.hits_disk = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def shared(cls, directory: str | os.PathLike[str] | None, *,
               memory_bytes: int = DEFAULT_MEMORY_BYTES,
               disk_bytes: int = DEFAULT_DISK_BYTES) -> ChunkCache:
        """Return this process's cache for ``directory`` (one per dir and bounds)."""
        key = (os.fspath(directory) if directory is not None else "", memory_bytes, disk_bytes)
        with cls._shared_lock:
            cache = cls._shared.get(key)
            if cache is None:
                cache = cls(directory, memory_bytes=memory_bytes, disk_bytes=disk_bytes)
                cls._shared[key] = cache
            return cache

    # --- memory ---------------------------------------------------------------------

    def get_memory(self, digest: str) -> bytes | None:
        """Return the verified chunk if it is in memory (and mark it recently used)."""
        with self._lock:
            data = self._mem.get(digest)
            if data is not None:
                self._mem.move_to_end(digest)
                self.hits_memory += 1
            return data

    def put_memory(self, digest: str, data: bytes) -> None:
        """Keep a verified chunk in memory, evicting the least recently used past the bound."""
        if len(data) > self.memory_bytes:
            return
        with self._lock:
            old = self._mem.pop(digest, None)
            if old is not None:
                self._mem_used -= len(old)
            self._mem[digest] = data
            self._mem_used += len(data)
            while self._mem_used > self.memory_bytes:
                _, evicted = self._mem.popitem(last=False)
                self._mem_used -= len(evicted)

    @property
    def memory_used(self) -> int:
        return self._mem_used

    # --- disk -----------------------------------------------------------------------

    @staticmethod
    def _path(directory: Path, digest: str) -> Path:
        return directory / digest[:2] / f"{digest}.zst"

    def get_disk(self, digest: str) -> bytes | None:
        """Return the stored object bytes from disk (unverified), or None."""
        if self.directory is None:
            return None
        path = self._path(self.directory, digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: harmless
            os.utime(path)
        with self._lock:
            self.hits_disk += 1
        return data

    def put_disk(self, digest: str, stored: bytes) -> None:
        """Write a fetched object into the disk cache (temp + rename), then enforce the bound."""
        if self.directory is None:
            return
        path = self._path(self.directory, digest)
        tmp = path.parent / f".tmp.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(stored)
            os.replace(tmp, path)
        except OSError:
            # A full or read-only cache disk must not fail a restore: the chunk is
            # already verified and in memory; it just is not cached on disk.
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._lock:
            if self._disk_estimate is not None:
                self._disk_estimate += len(stored)
            over = self._disk_estimate is None or self._disk_estimate > self.disk_bytes
        if over:
            self._enforce_disk_bound(self.directory)

    def discard_disk(self, digest: str) -> None:
        """Remove a cached object that failed verification."""
        if self.directory is not None:
            self._path(self.directory, digest).unlink(missing_ok=True)

    def _enforce_disk_bound(self, directory: Path) -> None:
        files: list[tuple[float, int, Path]] = []
        now = time.time()
        for sub in directory.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(".tmp."):
                    if st.st_mtime < now - _TMP_MAX_AGE_SECONDS:  # left by a dead process
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                files.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        if total > self.disk_bytes:
            # Evict to 90% so that the next few puts do not each trigger a rescan.
            target = self.disk_bytes * 9 // 10
            for _, size, path in sorted(files, key=lambda f: f[0]):
                if total <= target:
                    break
                path.unlink(missing_ok=True)
                total -= size
        with self._lock:
            self._disk_estimate = total

    def disk_used(self) -> int:
        """Return the bytes the disk cache holds now (a directory scan)."""
        if self.directory is None:
            return 0
        return sum(e.stat().st_size for sub in self.directory.iterdir() if sub.is_dir()
                   for e in os.scandir(sub) if not e.name.startswith(".tmp."))
