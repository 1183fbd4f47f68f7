"""Wait for fds to become readable, with ``poll(2)``: never ``select(2)``.

``select`` cannot watch an fd numbered 1024 or more (``filedescriptor out of range``),
and a server with a thousand VMs connected hands out such numbers all the time. Every
wait in pagein goes through :func:`wait_readable` (or a ``select.poll`` of its own).
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import Protocol

__all__ = ["wait_readable"]

_READY = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def wait_readable(fds: Iterable[int | _HasFileno], timeout: float | None) -> set[int]:
    """Return the fds of ``fds`` that are readable (or hung up, or in error) within
    ``timeout`` seconds (None: wait forever); the empty set when the time ran out.

    Wraps ``poll(2)``. A hang-up counts as readable: the caller's read then sees EOF,
    as it would after ``select``.
    """
    p = select.poll()
    numbers = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
    for fd in numbers:
        p.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return {fd for fd, ev in p.poll(ms) if ev & _READY}
