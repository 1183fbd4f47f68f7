"""The supervisor <-> worker control channel: length-prefixed JSON messages with fds.

A Unix stream socketpair. Each message is one ``sendmsg`` of an 8-byte header (magic
``b"PI"``, u16 fd count, u32 payload length) with its fds attached (SCM_RIGHTS), then the
JSON payload. The receiver reads exactly the header (which brings the fds), then the
payload. Payloads are bounded (:data:`MAX_PAYLOAD`): a handshake may list thousands of
regions, but nothing on this channel is unbounded.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Collection, Sequence

from pagein.errors import PageinError
from pagein.sys.fdpass import recv_with_fds, send_with_fds

__all__ = ["MAX_PAYLOAD", "ControlError", "name_fds", "recv_msg", "send_msg"]

MAX_PAYLOAD = 16 * 1024 * 1024
_MAX_FDS = 8
_HEADER = struct.Struct("=2sHI")
_MAGIC = b"PI"


class ControlError(PageinError):
    """The other end of a control channel sent something that is not a message."""


def send_msg(sock: socket.socket, doc: dict[str, object], fds: Sequence[int] = ()) -> None:
    """Send one message (the fds stay open here; the receiver gets its own copies)."""
    payload = json.dumps(doc, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ControlError(f"control message of {len(payload)} bytes is over {MAX_PAYLOAD}")
    header = _HEADER.pack(_MAGIC, len(fds), len(payload))
    if fds:
        send_with_fds(sock, header, list(fds))
    else:
        sock.sendall(header)
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ControlError("control channel closed in the middle of a message")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    """Receive one message and its fds (now owned by the caller); None at EOF."""
    got = recv_with_fds(sock, _HEADER.size, _MAX_FDS)
    fds = got.fds
    try:
        if not got.data:
            return None
        data = got.data
        if len(data) < _HEADER.size:
            data += _recv_exact(sock, _HEADER.size - len(data))
        magic, nfds, length = _HEADER.unpack(data)
        if magic != _MAGIC or length > MAX_PAYLOAD or nfds != len(fds) or got.truncated:
            raise ControlError(f"bad control message header {data!r} with {len(fds)} fds")
        doc = json.loads(_recv_exact(sock, length))
        if not isinstance(doc, dict):
            raise ControlError("control message is not a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return doc, fds


def name_fds(names: object, fds: Sequence[int], *, required: Collection[str],
             optional: Collection[str] = ()) -> dict[str, int]:
    """Pair the fds of a message with the names it sent beside them (``"fds": [...]``).

    Fds travel by position; the names say which is which, so a sender and a receiver
    of two versions, or a message with an fd missing, fail here, naming the fd, instead
    of serving a VM from the wrong descriptor. The fds are not closed on error.
    """
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ControlError("a message with fds and no list of their names")
    if len(names) != len(fds):
        raise ControlError(f"a message names {len(names)} fds and carries {len(fds)}")
    if len(set(names)) != len(names):
        raise ControlError(f"a message names an fd twice: {names[:8]!r}")
    if unknown := [n for n in names if n not in required and n not in optional]:
        raise ControlError(f"a message carries an unknown fd {unknown[0][:40]!r}")
    if missing := [n for n in required if n not in names]:
        raise ControlError(f"a message lacks the {missing[0]!r} fd")
    return dict(zip(names, fds, strict=True))
