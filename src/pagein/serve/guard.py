"""Never serve a memory file that changed while it was served: :class:`SourceGuard`.

A raw memory file written while VMs are restored from it would put bytes into their
guests that no snapshot ever held. Each process that serves runs one guard over the
source it opened itself (every worker; the supervisor only with ``--workers 0``, since
otherwise it serves nothing):

- it takes a read lease on the file (:meth:`RawFileSource.take_lease`), so a writer's
  ``open()`` waits and this process gets ``SIGIO``. The handler only sets a flag; the
  guard's thread, which looks at that flag every 0.1 s, asks the source what happened
  (``F_GETLEASE``), and
- every second, lease or not, and before each VM is served, it compares the open
  file's identity (``st_dev, st_ino``, size, mtime, ctime) with the one at open — the
  only check where no lease can be had. A worker compares with the identity the
  supervisor saw (:meth:`expect`): a worker started after the file was renamed over
  would otherwise serve the new file to VMs restored from the old one.

On a change it sets the **tripwire**, one byte both fault engines read before every
fill ioctl: from then on no fill is issued, so every session on that source fails at its
next fill, loudly (its guest freezes; nothing stale or new is ever installed). It logs
one ERROR naming the file, then gives the lease back after a grace period (a fill
started before the tripwire has ended by then), so the writer's ``open()`` goes on
instead of waiting ``/proc/sys/fs/lease-break-time`` seconds.

With a lease the writer cannot change a byte before the tripwire is set. Without one a
write is noticed within a second: a fault served in that second may see the new bytes
(said in the log line that explains why there is no lease).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from pagein.snapshot.raw import RawFileSource
from pagein.snapshot.source import PageSource

__all__ = ["SourceGuard", "changed_message"]

log = logging.getLogger("pagein.serve")

_TICK_S = 0.1  # how often the thread looks at the signal flag
_IDENTITY_EVERY_S = 1.0  # how often it compares the file's identity
_GRACE_S = 0.5  # between setting the tripwire and giving the lease back

_lease_signalled = False  # set by the SIGIO handler, read by every guard's thread
_installed = False


def _on_sigio(signum: int, frame: FrameType | None) -> None:
    """A lease break (or other SIGIO): only set the flag the guards' threads read."""
    global _lease_signalled
    _lease_signalled = True


def _install_handler() -> bool:
    """Install the SIGIO handler once (main thread only); False where that is impossible."""
    global _installed
    if _installed:
        return True
    try:
        if signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return False  # the program handles SIGIO itself: do not take it over
        signal.signal(signal.SIGIO, _on_sigio)
    except ValueError:  # not the main thread
        return False
    _installed = True
    return True


def changed_message(path: str, why: str) -> str:
    """The one sentence that says a served memory file changed, and what to do."""
    return (f"snapshot memory file {path} changed while it was served ({why}): refusing to "
            "serve it; a snapshot's memory file must not be written while VMs are "
            "restored from it (restore from a copy, or stop pagein serve first)")


class SourceGuard:
    """Watch one served source; :attr:`tripwire` turns 1 once it changed. A source that
    is not a raw memory file (a store, S3) has nothing to watch: the tripwire stays 0."""

    def __init__(self, source: PageSource) -> None:
        self.tripwire = bytearray(8)  # read by the engines (the native core via its buffer)
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._source = source if isinstance(source, RawFileSource) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def identity(self) -> list[int] | None:
        """The watched file's identity at open (None: not a raw memory file)."""
        return None if self._source is None else list(self._source.identity)

    def expect(self, identity: Sequence[int] | None) -> None:
        """Hold the file to the identity another process saw (the supervisor's, for a
        worker that opens the path later): a file replaced in between is refused."""
        if identity is not None and self._source is not None:
            self._source.expect(identity)

    def start(self) -> None:
        """Take the lease (when the SIGIO handler can be installed) and start watching."""
        src = self._source
        if src is None or self._thread is not None:
            return
        why = (src.take_lease() if _install_handler()
               else "no SIGIO handler could be installed (not the main thread, or the "
                    "program has its own)")
        if why is not None:
            log.warning("%s; checking its size and times every second instead (a write is "
                        "noticed within a second, not prevented)", why)
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="pagein-source-guard")
        self._thread.start()

    def message(self) -> str | None:
        """The sentence for a session that stopped because the file changed, or None."""
        if self.reason is None or self._source is None:
            return None
        return changed_message(self._source.path, self.reason)

    def check(self) -> str | None:
        """Look now (before a session starts serving); trip and return the reason if the
        source changed."""
        src = self._source
        if src is None:
            return None
        with self._lock:
            if self.reason is not None:
                return self.reason
            why = src.changed()
            if why is None:
                return None
            self.reason = why
            self.tripwire[0] = 1
        log.error("%s", changed_message(src.path, why))
        if src.leased:
            # Fills started before the tripwire end within the grace; then the writer's
            # open() may go on. The tripwire stays set for good.
            time.sleep(_GRACE_S)
            src.release_lease()
        return why

    def _watch(self) -> None:
        global _lease_signalled
        last = time.monotonic()
        while not self._stop.wait(_TICK_S) and self.reason is None:
            now = time.monotonic()
            if _lease_signalled or now - last >= _IDENTITY_EVERY_S:
                _lease_signalled = False  # another guard of this process may look too: fine
                last = now
                self.check()

    def close(self) -> None:
        """Stop watching and give the lease back (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._source is not None:
            self._source.release_lease()
