"""File-descriptor passing (SCM_RIGHTS) and peer credentials (SO_PEERCRED) on Unix sockets."""

from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass

__all__ = ["PeerCred", "Received", "kill_through", "peer_credentials", "peer_pidfd",
           "recv_with_fds", "send_with_fds"]

_SO_PEERPIDFD = 77  # Linux 6.5+: a pidfd of the peer as it connected


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The process at the other end of a Unix socket, as the kernel recorded it at connect."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """Return the peer's pid/uid/gid (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd of the process at the other end (close it when done), or -1.

    ``SO_PEERPIDFD`` (Linux 6.5+) names exactly the process that connected;
    ``pidfd_open(pid)`` right after accept is the fallback (a PID seen at connect time may
    already name another process by the time it is signalled; a pidfd never does).
    """
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


def kill_through(pidfd: int) -> bool:
    """SIGKILL the process behind ``pidfd``; False when there is none (fd -1, or gone)."""
    if pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:  # ProcessLookupError included: it already exited
        return False
    return True


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> int:
    """Send ``data`` in one ``sendmsg`` with ``fds`` attached as SCM_RIGHTS."""
    return socket.send_fds(sock, [data], fds)


@dataclass(frozen=True, slots=True)
class Received:
    """One ``recvmsg``: the bytes, the fds now owned by the caller, and whether any were cut."""

    data: bytes
    fds: list[int]
    truncated: bool


def recv_with_fds(sock: socket.socket, max_bytes: int, max_fds: int = 4) -> Received:
    """Receive one message and its SCM_RIGHTS fds (close-on-exec set on each).

    ``truncated`` is set when the kernel cut the data or dropped fds (MSG_TRUNC/MSG_CTRUNC);
    the fds that did arrive are still returned so the caller can close them.
    """
    data, fds, flags, _addr = socket.recv_fds(sock, max_bytes, max_fds, socket.MSG_CMSG_CLOEXEC)
    for fd in fds:
        os.set_inheritable(fd, False)
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return Received(data, list(fds), truncated)
