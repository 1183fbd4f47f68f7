"""Who may connect to ``pagein serve``: the socket's permissions and the peer allow-list.

The server runs as root and copies snapshot memory into whatever uffd a peer hands it,
so whoever can connect can read the snapshot, every byte. Two locks, both on by default:

- the socket file is created with mode 0600 (``--socket-mode``, ``--socket-group`` to
  widen it), whatever the umask: it is bound in a fresh 0700 directory of its own,
  given its final mode and group there, and only then renamed into place, so there is
  no moment when it exists at ``--socket`` with wider permissions;
- every connection's ``SO_PEERCRED`` is checked at accept against :class:`Access`
  (root, the server's own uid, ``--allow-uid``, ``--allow-gid``). A refused peer's
  connection is closed before a byte of it is read: it is never killed (it is not a
  VMM of ours, and it may not even be the process that connected) and never counted
  as a bad handshake. :class:`RefusalLog` keeps the log bounded when a peer connects
  forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pagein.errors import PageinError
from pagein.serve.ratelog import RateLimitedLog
from pagein.sys.fdpass import PeerCred

__all__ = ["DEFAULT_SOCKET_MODE", "GROUP_SOCKET_MODE", "Access", "RefusalLog", "listen_unix"]

log = logging.getLogger("pagein.serve")

DEFAULT_SOCKET_MODE = 0o600  # only the server's own uid (and root) can connect
GROUP_SOCKET_MODE = 0o660  # the default when --socket-group names a group
_SHOWN_IDS = 8  # ids listed in a refusal line; the rest are counted


def _ids(ids: Iterable[int]) -> str:
    shown = sorted(ids)
    text = ", ".join(str(i) for i in shown[:_SHOWN_IDS])
    if len(shown) > _SHOWN_IDS:
        text += f" and {len(shown) - _SHOWN_IDS} more"
    return text or "none"


@dataclass(frozen=True, slots=True)
class Access:
    """The peers a server serves: by uid, or by the gid they connected with.

    Root and the server's own uid are always in ``uids``: either can read the server's
    memory anyway (ptrace), so refusing them would protect nothing. ``gids`` is matched
    against the peer's effective gid as ``SO_PEERCRED`` recorded it at connect
    (supplementary groups are not part of it).
    """

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = ()) -> Access:
        return cls(frozenset({0, os.geteuid(), *allow_uids}), frozenset(allow_gids))

    def permits(self, peer: PeerCred) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids

    def describe(self) -> str:
        """The allow-list as one log fragment: ``uids 0, 1000; gids none``."""
        return f"uids {_ids(self.uids)}; gids {_ids(self.gids)}"


class RefusalLog:
    """Log refused peers in bounded lines (a peer may connect in a loop forever): at most
    ``per_window`` lines per ``window_s`` seconds for each uid and four times that for
    all uids together, then one line saying how many more were held back
    (:class:`~pagein.serve.ratelog.RateLimitedLog`)."""

    def __init__(self, access: Access, per_window: int = 5, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._access = access
        self._lines = RateLimitedLog(log, lines=per_window, interval_s=window_s,
                                     total_lines=4 * per_window, clock=clock)

    def refused(self, peer: PeerCred) -> None:
        self._lines.log(logging.WARNING, ("refused", peer.uid),
                        f"refused a connection from pid={peer.pid} uid={peer.uid} "
                        f"gid={peer.gid}",
                        "not in the allow-list (%s; widen it with --allow-uid or "
                        "--allow-gid); closed unread", self._access.describe())


def listen_unix(path: str, mode: int, gid: int | None, backlog: int = 128) -> socket.socket:
    """Listen on a Unix stream socket at ``path`` with permissions ``mode`` (and group
    ``gid``), replacing a stale socket file there atomically.

    ``bind`` creates the socket file with the umask's permissions, so it is created in a
    private 0700 directory next to ``path``, chmod-ed and chown-ed there, listening
    (a VMM that finds it connects at once), and then renamed to ``path``. The bind goes
    through ``/proc/self/fd/N/`` so the private directory's name does not count against
    the 108-byte limit of a socket path. Raises :class:`PageinError` naming ``--socket``,
    ``--socket-mode`` or ``--socket-group``.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = tempfile.mkdtemp(prefix=".pagein-", dir=parent)
    except OSError as e:
        raise PageinError(f"cannot create the socket in the directory of --socket {path}: "
                          f"{e.strerror}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dfd = -1
    step = "bind"
    try:
        dfd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.bind(f"/proc/self/fd/{dfd}/s")
        made = os.path.join(private, "s")
        step = f"give it mode {mode:04o} (--socket-mode)"
        os.chmod(made, mode)
        if gid is not None:
            step = f"give it group {gid} (--socket-group)"
            os.chown(made, -1, gid)
        step = "listen"
        sock.listen(backlog)
        step = "rename it into place"
        os.rename(made, path)
    except OSError as e:
        sock.close()
        raise PageinError(f"cannot listen on --socket {path}: {step} failed: "
                          f"{e.strerror}") from e
    finally:
        if dfd >= 0:
            os.close(dfd)
        with contextlib.suppress(OSError):
            shutil.rmtree(private)
    return sock
