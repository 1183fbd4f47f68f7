"""Restore a snapshot into this process's own memory, lazily, through a handler process.

:func:`restore_lazily` maps anonymous memory the size of the snapshot, registers it with
a new userfaultfd (MISSING mode, ``UFFD_FEATURE_EVENT_REMOVE``), starts ``pagein serve``
in a *separate process* on a private socket and hands it the uffd exactly as Firecracker
does. One code path serves VMs and processes alike.

Why a separate process: a Python thread that faults on registered memory while holding
the GIL (``Mapping.read`` does) blocks every thread of its process, including any
handler thread there. A handler process has its own GIL.

Failure is loud, never silent zeros: this process keeps its copy of the uffd for as long
as the mapping exists, so if the handler dies, touching a missing page blocks instead
of reading zeros; a watchdog logs the death at ERROR and :meth:`LazyRestore.stats`,
:meth:`LazyRestore.check` and :meth:`LazyRestore.close` raise
:class:`~pagein.errors.HandlerError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
from types import TracebackType
from typing import Self

from pagein.errors import HandlerError, SnapshotFormatError
from pagein.serve.firecracker import Region, connect_and_send
from pagein.serve.handler import HandlerProcess
from pagein.serve.session import STATS_REQUEST
from pagein.serve.stats import ServeStats
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName
from pagein.snapshot.open import open_source
from pagein.sys.mapping import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

__all__ = ["LazyRestore", "restore_lazily"]

log = logging.getLogger("pagein.serve")


class LazyRestore:
    """A lazily restored snapshot in this process: :attr:`mapping` fills on first touch.

    Create with :func:`restore_lazily`; use as a context manager. ``close()`` unmaps the
    memory first (so nothing can fault any more), then stops the handler.
    """

    def __init__(self, mapping: Mapping, uffd: Userfaultfd, sock: socket.socket,
                 handler: HandlerProcess, source: str) -> None:
        self.mapping = mapping
        self.source = source
        self._uffd = uffd
        self._sock = sock
        self._handler = handler
        self._closing = False
        self._closed = False
        self._lock = threading.Lock()
        self._last: ServeStats | None = None
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name="pagein-handler-watchdog")
        self._watchdog.start()

    @property
    def handler_pid(self) -> int:
        return self._handler.proc.pid

    @property
    def size_bytes(self) -> int:
        return self.mapping.length

    def _watch(self) -> None:
        code = self._handler.proc.wait()
        if not self._closing:
            log.error("pagein handler pid %d exited with status %s while serving %s at "
                      "0x%x-0x%x: touching a page not yet filled now blocks forever; "
                      "see %s", self._handler.proc.pid, code, self.source, self.mapping.address,
                      self.mapping.end, self._handler.log_path)

    def _died(self) -> HandlerError:
        # The socket can report EOF a moment before the process can be reaped.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._handler.proc.wait(timeout=5)
        last = self._handler.last_log_line()
        tail = f": {last}" if last else ""
        return HandlerError(
            f"the pagein handler (pid {self._handler.pid}) for {self.source} exited with status "
            f"{self._handler.proc.returncode}{tail}; pages not yet filled cannot be restored")

    def check(self) -> None:
        """Raise :class:`HandlerError` if the handler process is gone."""
        if self._handler.proc.poll() is not None and not self._closing:
            raise self._died()

    def stats(self, timeout: float = 10.0) -> ServeStats:
        """Ask the handler for its counters (faults served, pages, bytes, zero pages)."""
        if self._closed:
            if self._last is None:
                raise HandlerError("this restore is closed and no statistics were collected")
            return self._last
        self.check()
        with self._lock:
            self._sock.settimeout(timeout)
            try:
                self._sock.sendall(STATS_REQUEST)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        raise self._died()
                    buf += chunk
            except (TimeoutError, OSError) as e:
                raise HandlerError(f"the pagein handler (pid {self._handler.pid}) did not answer "
                                   f"a statistics request within {timeout:g} s: {e}") from e
            finally:
                self._sock.settimeout(None)
        self._last = ServeStats.from_dict(json.loads(buf))
        return self._last

    def close(self) -> None:
        """Unmap the memory, then stop the handler; raise if it had died (idempotent)."""
        if self._closed:
            return
        died = self._handler.proc.poll() is not None
        if not died:
            try:
                self.stats()
            except HandlerError:
                died = self._handler.proc.poll() is not None
        self._closing = True
        self._closed = True
        # Unmap before releasing the uffd: once the range is gone nothing can fault, so
        # no access can ever see the zero pages an unserved range would fall back to.
        self.mapping.close()
        self._sock.close()
        self._uffd.close()
        self._handler.stop()
        self._watchdog.join(timeout=1)
        error = self._died() if died else None
        shutil.rmtree(self._handler.workdir, ignore_errors=True)
        if error is not None:
            raise error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except HandlerError:
            if exc is None:
                raise


def restore_lazily(source: str, *, strategy: str | StrategyName = StrategyName.ON_DEMAND,
                   readahead_bytes: int = DEFAULT_READAHEAD_BYTES, hugetlb: bool = False,
                   start_timeout: float = 30.0) -> LazyRestore:
    """Map the snapshot ``source`` into this process, to be filled page by page on touch.

    ``source`` is anything :func:`pagein.snapshot.open.open_source` accepts (a raw memory
    file path, ``file://``, ``s3://``, ``dir://``). ``strategy`` is a
    :class:`~pagein.serve.strategies.StrategyName` value; ``hugetlb`` backs the memory
    with 2 MiB pages (``vm.nr_hugepages`` must have enough free).

    Raises :class:`HandlerError` when the handler cannot start, and the source's own
    errors (:class:`~pagein.errors.SourceError`, ...) when the snapshot cannot be opened.

    Safety: touching :attr:`LazyRestore.mapping` from this process is safe (the handler
    is another process); touching it after close crashes the process.
    """
    name = StrategyName(strategy).value
    with open_source(source) as src:
        size = src.size
    page = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
    if size % page:
        raise SnapshotFormatError(f"snapshot {source} is {size} bytes, not a multiple of the "
                                  f"page size {page}: it cannot be one memory region")
    workdir = tempfile.mkdtemp(prefix="pagein-local-")
    mapping: Mapping | None = None
    uffd: Userfaultfd | None = None
    handler: HandlerProcess | None = None
    try:
        mapping = Mapping.anonymous(size, hugetlb=hugetlb)
        uffd = Userfaultfd.open(Feature.EVENT_REMOVE)
        uffd.register(mapping.address, size, RegisterMode.MISSING)
        opts = HandlerProcess.options_for_one_vm(source, workdir, strategy=StrategyName(name),
                                                 readahead_bytes=readahead_bytes)
        handler = HandlerProcess.start(opts, workdir, start_timeout)
        sock_path = handler.socket_path
        sock = connect_and_send(sock_path, [Region(mapping.address, size, 0, page)], uffd)
        restore = LazyRestore(mapping, uffd, sock, handler, source)
    except BaseException:
        if handler is not None:
            handler.stop(timeout=0)
        if mapping is not None:
            mapping.close()
        if uffd is not None:
            uffd.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        # One round trip proves the handler accepted the handshake and serves this range;
        # a refused handshake would otherwise only show as a touch that never returns.
        restore.stats(timeout=start_timeout)
    except BaseException:
        with contextlib.suppress(HandlerError):
            restore.close()
        raise
    return restore
