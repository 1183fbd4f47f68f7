"""Crash points: a serving worker SIGKILLs itself at a chosen point, once, for the tests
that prove a VM survives its worker dying there (:mod:`pagein.serve.recovery`).

``PAGEIN_CRASH_AT=POINT:N:TOKEN`` in the server's environment: the first worker to claim
``POINT`` (by removing the file ``TOKEN``, so exactly one worker of the whole server does)
kills itself the ``N``-th time it reaches it. Points:

- ``fill``: a fill ioctl returned, its pages not yet marked filled (both engines);
- ``event``: ``read()`` returned a non-fault event (a REMOVE), not yet applied;
- ``prefetch``: a background plan (working set, populate-all) filled a chunk, with more
  to come;
- ``serve``: the worker received a VM from the supervisor and has not served it yet.

Nothing happens without the variable; it is read when an engine or session starts, never
on the fault path.
"""

from __future__ import annotations

import enum
import logging
import os
import signal

__all__ = ["CrashPoint", "claim", "countdown", "crash"]

log = logging.getLogger("pagein.serve")

_ENV = "PAGEIN_CRASH_AT"


class CrashPoint(enum.IntEnum):
    """The points (the numbers are the C core's ``set_crash`` codes)."""

    FILL = 1
    EVENT = 2
    PREFETCH = 3
    SERVE = 4


def claim(point: CrashPoint) -> int:
    """The countdown for ``point`` if this process is the one to crash there, else 0."""
    spec = os.environ.get(_ENV)
    if not spec:
        return 0
    name, _, rest = spec.partition(":")
    count, _, token = rest.partition(":")
    if name.upper() != point.name or not count.isdigit() or not token:
        return 0
    try:
        os.unlink(token)  # exactly one claimant in the whole server
    except OSError:
        return 0
    return max(1, int(count))


def crash(point: CrashPoint) -> None:
    """Die here, as a SIGKILL would kill a worker (no cleanup, no exit handlers)."""
    log.error("crash point %s reached: SIGKILL (PAGEIN_CRASH_AT)", point.name.lower())
    os.kill(os.getpid(), signal.SIGKILL)


def countdown(left: int, point: CrashPoint) -> int:
    """One more arrival at ``point``: crash at the last one; the arrivals left."""
    if left == 1:
        crash(point)
    return left - 1
