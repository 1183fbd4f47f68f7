"""The two systemd protocols a service speaks, by their environment variables alone.

- ``sd_notify``: ``NOTIFY_SOCKET`` names a Unix datagram socket (a path, or ``@name``
  for the abstract namespace); the service sends ``READY=1``, ``STOPPING=1``,
  ``STATUS=...`` lines to it, one datagram each. See ``sd_notify(3)``.
- socket activation: ``LISTEN_PID`` (must be this process) and ``LISTEN_FDS`` (how many
  fds, starting at 3) hand the service sockets systemd already bound. See
  ``sd_listen_fds(3)``.

No libsystemd: both are a few lines over the stdlib, and they work under any manager
that implements them.
"""

from __future__ import annotations

import os
import socket

from pagein.errors import ConfigError

__all__ = ["LISTEN_FDS_START", "inherited_listener", "notify"]

LISTEN_FDS_START = 3
_MAX_STATUS = 512  # bytes of one STATUS= line


def _notify_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return "\0" + addr[1:]  # the abstract namespace
    return addr if addr.startswith("/") else None  # unset, or a kind we do not speak


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) as one datagram to ``NOTIFY_SOCKET``.

    Returns False when it is unset (not run by a service manager) or the send failed: a
    notification is advice to the manager, never a reason to stop serving.
    """
    addr = _notify_address()
    if addr is None:
        return False
    data = "\n".join(line[:_MAX_STATUS] for line in lines).encode(errors="replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, addr)
    except OSError:
        return False
    return True


def inherited_listener() -> socket.socket | None:
    """The listening Unix stream socket systemd passed (fd 3), or None without one.

    ``LISTEN_PID`` must be this process (the variables are meant for one process only,
    and are removed here so that children do not take them for theirs). Raises
    :class:`ConfigError` when they are malformed, pass more than one fd, or fd 3 is not
    a listening Unix stream socket.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None  # meant for another process (e.g. the shell that started us)
    if not count.isdigit() or int(count) != 1:
        raise ConfigError(f"LISTEN_FDS={count[:20]!r}: pagein serve takes exactly one "
                          "socket from systemd (one ListenStream= in its .socket unit)")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as e:
        raise ConfigError(f"LISTEN_FDS=1 but fd {LISTEN_FDS_START} is not a socket: "
                          f"{e.strerror}") from e
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ConfigError(f"fd {LISTEN_FDS_START} from systemd is not a listening Unix "
                          "stream socket: use ListenStream=/path in the .socket unit")
    sock.set_inheritable(False)
    return sock
