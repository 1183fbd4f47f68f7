"""Accepting VMMs when fds run short: the fd limit, a reserve per connection, backoff.

Each VM costs the supervisor four fds while it runs (uffd, socket, state memfd, pidfd).
Three of them are opened *after* ``accept()``: the pidfd, the uffd arriving with the
handshake (``SCM_RIGHTS``: without a free fd the kernel drops it and sets
``MSG_CTRUNC``) and the state memfd. So before accepting, the :class:`Acceptor`
reserves those three (``/dev/null`` opened three times, handed to the connection's
thread, which closes one just before each step that needs it), and only while a few
more are free. When the reserve or
``accept()`` fails with EMFILE/ENFILE, the listener is left out of the poll set for a
backoff (10 ms doubling to 1 s) instead of spinning on a backlog it cannot take; the
waiting VMMs stay queued in the kernel and are taken once fds are free. One log line a
second at most says so, with the number held back.

Threads of other connections may take a slot freed by a reserve before its owner does
(fds are per process); the reserve makes that rare, and the owner's step then fails
with EMFILE like any other: logged, the connection closed, never a frozen guest.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import time
from collections.abc import Callable

from pagein.serve.ratelog import RateLimitedLog

__all__ = ["Acceptor", "Spare", "raise_fd_limit"]

log = logging.getLogger("pagein.serve")

#: Fds a connection opens after accept: its pidfd, the uffd it sends, its state memfd.
SPARE_FDS = 3
#: Free fds beyond the reserve that must exist for a new connection to be taken: the
#: handshakes already running free their reserved slots one by one, and a new reserve
#: must not take those slots from them.
_HEADROOM_FDS = 8
_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKOFF_S = (0.01, 1.0)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return ``(before, now)``.

    The usual soft limit of 1024 would cap a server at ~250 VMs although the hard limit
    allows far more. Workers, started after this, inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft in (hard, resource.RLIM_INFINITY):
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, hard


class Spare:
    """Fds held for one connection until it needs them (see the module docstring)."""

    def __init__(self, count: int, headroom: int = 0) -> None:
        """Hold ``count`` fds; raise OSError (EMFILE) unless ``headroom`` more are free."""
        self._fds: list[int] = []
        try:
            for _ in range(count + headroom):
                self._fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self.close()
            raise
        for _ in range(headroom):
            self.take()

    def take(self) -> None:
        """Free one reserved slot: the next fd this connection opens may use it."""
        if self._fds:
            os.close(self._fds.pop())

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


class Acceptor:
    """Accept on ``listener`` with a reserve, backoff and bounded logging.

    Call :meth:`watch` before each poll (it adds or removes the listener from the poll
    set), :meth:`wait_ms` for the poll's timeout, and :meth:`accept` when the listener
    is readable.
    """

    def __init__(self, listener: socket.socket, fd_limit: int,
                 connected: Callable[[], int]) -> None:
        self._listener = listener
        self._fd_limit = fd_limit
        self._connected = connected  # how many VMs are connected, for the log line
        self._log = RateLimitedLog(log, lines=1, interval_s=1.0, total_lines=2)
        self._watched = False
        self._resume_at = 0.0
        self._backoff = _BACKOFF_S[0]
        self._short = False  # the last attempt failed for want of fds

    def fileno(self) -> int:
        return self._listener.fileno()

    def watch(self, poller: select.poll) -> None:
        """Keep ``poller`` watching the listener unless a backoff is running."""
        want = time.monotonic() >= self._resume_at
        if want and not self._watched:
            poller.register(self._listener.fileno(), select.POLLIN)
        elif not want and self._watched:
            poller.unregister(self._listener.fileno())
        self._watched = want

    def wait_ms(self) -> int | None:
        """The poll timeout: until the backoff ends, or forever (None)."""
        if self._watched:
            return None
        return max(1, int((self._resume_at - time.monotonic()) * 1000) + 1)

    def accept(self) -> tuple[socket.socket, Spare] | None:
        """A new connection and its reserve, or None (the reason logged, rate-limited)."""
        spare = None
        try:
            spare = Spare(SPARE_FDS, _HEADROOM_FDS)
            conn, _ = self._listener.accept()
        except OSError as e:
            if spare is not None:
                spare.close()
            if e.errno in _SHORT_OF:
                self._short_of_fds(e)
            elif e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                self._log.log(logging.WARNING, "accept", "accept", "failed: %s", e)
            return None
        if self._short:
            self._short = False
            self._backoff = _BACKOFF_S[0]
            self._log.flush("accept")
            self._log.log(logging.WARNING, "resumed", "accepting VMMs again",
                          "%d connected", self._connected())
        return conn, spare

    def _short_of_fds(self, e: OSError) -> None:
        self._short = True
        self._log.log(logging.ERROR, "accept", "cannot accept a VMM",
                      "%s (%d VMs connected, open-file limit %d); VMMs wait in the backlog "
                      "until fds are free: raise the limit (ulimit -n, systemd LimitNOFILE=)",
                      e.strerror, self._connected(), self._fd_limit)
        self._resume_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_S[1])
