"""Admission: take each connection to ``pagein serve``, decide what it is, and hand
each good VM to the pool (:mod:`pagein.serve.pool`).

Each connection's ``SO_PEERCRED`` is checked at accept against the allow-list
(:mod:`pagein.serve.access`; a refused peer is closed unread); for each peer admitted, a
short-lived thread reads what it sends, with the handshake timeout: a page-cache request
(:mod:`pagein.serve.pagecache`), or a VMM's handshake, checked against the served file
(pagein's identity line, :mod:`pagein.serve.identity`, then the regions) before any
page is served. A bad handshake costs one log line naming the field and, by default,
the VMM's life (as Firecracker advises: a VMM whose memory nobody serves is frozen
forever) — but only a peer that sent a uffd: a probe that sends nothing is closed and
left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time

from pagein.errors import HandshakeError, PageinError
from pagein.serve.accept import Acceptor, Spare
from pagein.serve.access import RefusalLog
from pagein.serve.firecracker import (
    Handshake,
    receive_handshake,
    uncovered_bytes,
    validate_regions,
)
from pagein.serve.identity import FileDigests, Identity, Verdict, reply, split_identity
from pagein.serve.options import BadHandshakePolicy, ServeOptions
from pagein.serve.pagecache import (
    PageCaches,
    is_cache_request,
    mapped_cache,
    read_cache_request,
    reply_cache,
)
from pagein.serve.pool import AttachedVm, Pool, kill_vmm
from pagein.serve.ratelog import RateLimitedLog
from pagein.serve.record import OutputNames
from pagein.serve.state import VmState
from pagein.snapshot.source import PageSource
from pagein.sys.fdpass import PeerCred, peer_credentials, peer_pidfd
from pagein.sys.mapping import PAGE_SIZE, hugetlb_pool, hugetlb_raise_hint
from pagein.sys.pagemap import open_peer_pagemap

__all__ = ["Admission"]

log = logging.getLogger("pagein.serve")


class Admission:
    """Admit the connections of one listener and hand each good VM to ``pool``."""

    def __init__(self, options: ServeOptions, source: PageSource, digests: FileDigests,
                 pool: Pool, caches: PageCaches) -> None:
        self.options = options
        self._source = source
        self._digests = digests
        self._pool = pool
        self._caches = caches
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._names = OutputNames()
        self._threads: list[threading.Thread] = []
        self.handshake_failures = 0
        self.refused_peers = 0  # connections refused by the allow-list
        self._access = options.access
        self._refusals = RefusalLog(self._access)
        # Lines a peer can trigger again and again: at most a few per peer (pid) per 10 s.
        self._peer_log = RateLimitedLog(log, lines=5, interval_s=10.0, total_lines=100)
        self._snapshot = f"{options.snapshot} " if options.snapshot else ""

    def _where(self, pid: int) -> str:
        """How log lines name the VM of VMM ``pid`` (and its snapshot, in a fleet)."""
        return f"{self._snapshot}vm pid={pid}"

    def accept(self, acceptor: Acceptor) -> None:
        """Accept one connection (if one waits) and read it in a thread of its own."""
        if (got := acceptor.accept()) is None:
            return
        conn, spare = got
        peer = self._admit(conn)
        if peer is None:
            spare.close()
            return
        # The pidfd now, at accept: by the time a bad handshake is judged the
        # peer may be gone and its PID another process's.
        spare.take()
        pidfd = peer_pidfd(conn, peer.pid)
        t = threading.Thread(target=self._handle, args=(conn, peer, pidfd, spare),
                             daemon=True, name="pagein-handshake")
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(t)
        t.start()

    def attaching(self) -> bool:
        """Whether a handshake is under way (a VM may be attaching)."""
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout_s: float) -> None:
        """Wait for the handshakes under way (each up to ``timeout_s``)."""
        for t in list(self._threads):
            t.join(timeout=timeout_s)

    # --- one connection ------------------------------------------------------------

    def _admit(self, conn: socket.socket) -> PeerCred | None:
        """The peer of a new connection if the allow-list serves it; else close it unread.

        Checked in the accept loop (one ``getsockopt``), so a refused peer costs no
        thread, no handshake read, no signal and no bad-handshake count.
        """
        try:
            peer = peer_credentials(conn)
        except OSError as e:
            log.warning("cannot read SO_PEERCRED of a new connection: %s", e)
            conn.close()
            return None
        if self._access.permits(peer):
            return peer
        conn.close()
        with self._lock:
            self.refused_peers += 1
        self._refusals.refused(peer)
        return None

    def _handle(self, conn: socket.socket, peer: PeerCred, pidfd: int, spare: Spare) -> None:
        try:
            self._take_vm(conn, peer, pidfd, spare)
        finally:
            spare.close()

    def _take_vm(self, conn: socket.socket, peer: PeerCred, pidfd: int, spare: Spare) -> None:
        """Read one VMM's handshake and hand the VM to the pool (or refuse it).

        ``spare`` holds an fd for each of the fds this opens (see
        :mod:`pagein.serve.accept`); each is freed just before its step.
        """
        spare.take()
        timeout = self.options.handshake_timeout
        deadline = time.monotonic() + timeout  # one handshake timeout for both steps
        try:
            if is_cache_request(conn, timeout):
                self._cache_request(conn, peer, pidfd)
                return
            hs = receive_handshake(conn, None, max(0.001, deadline - time.monotonic()))
        except HandshakeError as e:
            self._bad_handshake(conn, peer, pidfd, e)
            return
        except OSError as e:
            self._handshake_lost(conn, peer, pidfd, e)
            return
        checked = self._check(conn, peer, pidfd, hs)
        if checked is None:
            os.close(hs.uffd_fd)
            return
        hs = checked
        spare.take()
        try:
            cache = mapped_cache(peer.pid, hs.regions, self._caches.all())
        except HandshakeError as e:
            os.close(hs.uffd_fd)
            e.sent_uffd = True  # a VMM whose uffd was here: --on-bad-handshake applies
            self._bad_handshake(conn, peer, pidfd, e)
            return
        try:
            state = VmState.create(hs.regions)
        except (PageinError, OSError) as e:
            self._peer_log.log(logging.ERROR, peer.pid, self._where(peer.pid),
                               "cannot start serving: %s; closing the connection", e)
            os.close(hs.uffd_fd)
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return
        vm = AttachedVm(next(self._ids), peer, self._where(peer.pid), hs.regions, hs.uffd_fd,
                        conn, state, pidfd, cache=cache)
        if any(r.page_size != PAGE_SIZE for r in vm.regions):
            self._check_hugetlb(vm)
        o = self.options
        vm.doc = {"op": "serve", "vm": vm.id, "name": vm.name,
                  "regions": [[r.base_address, r.size_bytes, r.offset, r.page_size]
                              for r in vm.regions],
                  "features": int(hs.features), "pending": hs.rest[:4096].hex(),
                  "record": self._names.claim(o.record) if o.record else None,
                  "trace": self._names.claim(o.trace_path) if o.trace_path else None,
                  "cache": None if cache is None else [cache.size_bytes, cache.page_size]}
        self._pool.take(vm)

    def _check(self, conn: socket.socket, peer: PeerCred, pidfd: int,
               hs: Handshake) -> Handshake | None:
        """Check a handshake against the served file before any page is served; None
        when refused (the connection and pidfd are then dealt with, the uffd is not).

        pagein's identity line (:mod:`pagein.serve.identity`) is judged first: a VMM
        that sent one is told why it is refused and closed, not killed. Without one (a
        Firecracker VMM) the regions are all there is: a bad one is a bad handshake.
        """
        identity: Identity | None = None
        size = self._source.size
        try:
            deadline = time.monotonic() + self.options.handshake_timeout
            identity, rest = split_identity(conn, hs.rest, deadline)
            verdict = Verdict(())
            if identity is not None:
                verdict = self._digests.check(identity)
            if verdict.error is None:
                validate_regions(hs.regions, size)
        except HandshakeError as e:
            if identity is None and not e.field.startswith("identity"):
                e.sent_uffd = True  # a VMM whose uffd is here: --on-bad-handshake applies
                self._bad_handshake(conn, peer, pidfd, e)
                return None
            verdict = Verdict((), str(e))
        except OSError as e:
            self._handshake_lost(conn, peer, pidfd, e)
            return None
        if verdict.error is not None:
            with self._lock:
                self.handshake_failures += 1
            self._peer_log.log(logging.ERROR, peer.pid, self._where(peer.pid),
                               "refused: %s; told the VMM and closed the connection (no "
                               "page was served)", verdict.error)
            with contextlib.suppress(OSError):
                conn.sendall(reply(verdict))
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
            return None
        if identity is None and (short := uncovered_bytes(hs.regions, size)):
            self._peer_log.log(logging.WARNING, peer.pid, self._where(peer.pid),
                               "its regions cover %d bytes of the %d-byte memory file (%d "
                               "bytes never served): a Firecracker snapshot's regions cover "
                               "its memory file exactly; is %s the snapshot it restores?",
                               size - short, size, short, self._source.describe())
        if identity is not None:
            try:
                conn.sendall(reply(verdict))
            except OSError as e:
                self._handshake_lost(conn, peer, pidfd, e)
                return None
        return Handshake(hs.regions, hs.uffd_fd, rest, hs.features)

    def _handshake_lost(self, conn: socket.socket, peer: PeerCred, pidfd: int,
                        e: OSError) -> None:
        self._peer_log.log(logging.WARNING, peer.pid, self._where(peer.pid),
                           "handshake failed: %s; closing the connection", e)
        conn.close()
        if pidfd >= 0:
            os.close(pidfd)

    def _check_hugetlb(self, vm: AttachedVm) -> None:
        """For a VM with huge-page regions: open its pagemap (the engines check a hugetlb
        EEXIST in it: an empty pool says EEXIST too) and warn now, with the fix, when the
        pool cannot hold its pages (a VMM maps them MAP_NORESERVE: nothing is reserved,
        every fill takes a page from the pool)."""
        vm.pagemap_fd = open_peer_pagemap(vm.peer.pid, vm.pidfd)
        if vm.pagemap_fd < 0:
            log.warning("%s: cannot open /proc/%d/pagemap; an empty hugetlb pool will not "
                        "be told from a racing fill", vm.name, vm.peer.pid)
        for size in sorted({r.page_size for r in vm.regions} - {PAGE_SIZE}):
            need = sum(r.size_bytes for r in vm.regions if r.page_size == size) // size
            pool = hugetlb_pool(size)
            if pool is not None and pool[0] + pool[1] < need:
                log.warning("%s: its %d KiB-page regions need %d pages but the pool can give "
                            "%d now: fills past that fail unless the pool grows; %s", vm.name,
                            size // 1024, need, pool[0] + pool[1], hugetlb_raise_hint(size))

    def _cache_request(self, conn: socket.socket, peer: PeerCred, pidfd: int) -> None:
        """Hand the page cache of the page size asked for (made on first use) to a VMM
        that will map its guest memory from it; then close (see pagein.serve.pagecache)."""
        try:
            page_size = read_cache_request(conn, self.options.handshake_timeout)
            reply_cache(conn, self._caches.get(page_size))
        except HandshakeError as e:
            log.error("pid %d: %s; closing the connection", peer.pid, e)
            with contextlib.suppress(OSError):
                reply_cache(conn, None, str(e))
        except (PageinError, OSError, ValueError) as e:
            log.error("pid %d: cannot give it a page cache: %s", peer.pid, e)
            with contextlib.suppress(OSError):
                reply_cache(conn, None, str(e))
        finally:
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)

    def _bad_handshake(self, conn: socket.socket, peer: PeerCred, pidfd: int,
                       e: HandshakeError) -> None:
        """Log a failed handshake and apply ``--on-bad-handshake`` to a peer that holds a uffd.

        Only a peer that sent a userfaultfd is a VMM whose guest would stay frozen: the
        kill policy is for it alone. A peer that sent nothing (a health probe, a
        monitoring ``connect()``, a second ``pagein serve`` checking whether the socket is
        in use) or bytes without a uffd is closed and left alone: killing it would kill
        whatever happens to connect.
        """
        where = self._where(peer.pid)
        try:
            if not e.sent_uffd and e.received_bytes == 0:
                log.debug("%s: connection closed without a handshake (nothing sent: a "
                          "probe or a socket check); closed", where)
                return
            with self._lock:  # handshake threads run at once
                self.handshake_failures += 1
            # A peer may reconnect with bad handshakes forever: its lines are rate-limited
            # (the values it sent are already cut short by HandshakeError).
            if not e.sent_uffd:
                self._peer_log.log(logging.WARNING, peer.pid, where,
                                   "%s; closing the connection (it sent no userfaultfd, so "
                                   "no guest waits on it: not killed)", e)
            elif (self.options.on_bad_handshake is BadHandshakePolicy.KILL and peer.pid > 1
                    and peer.pid != os.getpid()):
                self._peer_log.log(logging.ERROR, peer.pid, where, "%s; killing the VMM "
                                   "(--on-bad-handshake close keeps it alive)", e)
                kill_vmm(pidfd, peer.pid)
            else:
                self._peer_log.log(logging.ERROR, peer.pid, where,
                                   "%s; closing the connection", e)
        finally:
            conn.close()
            if pidfd >= 0:
                os.close(pidfd)
