"""The handshake on a real socket with a real uffd: split sends, big payloads, leftovers."""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import pytest

from pagein._abi import libc
from pagein._abi import uffd as abi
from pagein.errors import HandlerError, HandshakeError
from pagein.serve.firecracker import (
    Generation,
    Region,
    connect_and_send,
    encode_regions,
    receive_handshake,
)
from pagein.sys.fdpass import send_with_fds
from pagein.sys.uffd import Feature, Userfaultfd

pytestmark = pytest.mark.kernel

FILE = 1 << 30


def _regions(n: int) -> list[Region]:
    return [Region(0x7F0000000000 + i * 0x100000, 0x10000, i * 0x10000) for i in range(n)]


def test_payload_split_over_many_sends_is_reassembled() -> None:
    a, b = socket.socketpair()
    with a, b, Userfaultfd.open(Feature.EVENT_REMOVE) as uffd:
        regions = _regions(200)  # about 20 KiB of JSON
        payload = encode_regions(regions, Generation.LEGACY_KIB)
        assert len(payload) > 16 * 1024

        def send() -> None:
            send_with_fds(a, payload[:700], [uffd.fileno()])
            pieces = [payload[i:i + 997] for i in range(700, len(payload), 997)]
            # The bytes after the array travel with its last piece (one small write is
            # one read), so the handler must keep them rather than drop them.
            pieces[-1] += b'{"pagein": "stats"}\n'
            for piece in pieces:
                a.sendall(piece)

        t = threading.Thread(target=send)
        t.start()
        hs = receive_handshake(b, FILE, timeout=10)
        t.join()
        try:
            assert list(hs.regions) == regions
            assert os.readlink(f"/proc/self/fd/{hs.uffd_fd}") == "anon_inode:[userfaultfd]"
            assert hs.rest.startswith(b'{"pagein"')
        finally:
            os.close(hs.uffd_fd)


def test_connect_and_send_matches_what_the_handler_receives(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "h.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    with listener, Userfaultfd.open(Feature.EVENT_REMOVE) as uffd:
        regions = _regions(3)
        sock = connect_and_send(path, regions, uffd)
        conn, _ = listener.accept()
        with sock, conn:
            hs = receive_handshake(conn, FILE, timeout=5)
            os.close(hs.uffd_fd)
            assert list(hs.regions) == regions and hs.rest == b""


def test_truncated_handshake_then_close_is_an_error() -> None:
    a, b = socket.socketpair()
    with b, Userfaultfd.open(Feature.EVENT_REMOVE) as uffd:
        send_with_fds(a, encode_regions(_regions(2))[:-5], [uffd.fileno()])
        a.close()
        with pytest.raises(HandshakeError) as e:
            receive_handshake(b, FILE, timeout=5)
        assert e.value.field == "handshake"
        assert "closed the socket" in str(e.value)


def test_uffd_without_api_is_refused() -> None:
    """A uffd on which UFFDIO_API was never called cannot be served: say so at once."""
    a, b = socket.socketpair()
    fd = os.open("/dev/userfaultfd", os.O_RDWR)
    raw = libc.ioctl_ptr(fd, abi.USERFAULTFD_IOC_NEW, os.O_CLOEXEC)
    os.close(fd)
    assert raw >= 0, ctypes.get_errno()
    with a, b:
        send_with_fds(a, encode_regions(_regions(1)), [raw])
        os.close(raw)
        with pytest.raises(HandshakeError) as e:
            receive_handshake(b, FILE, timeout=5)
        assert e.value.field == "uffd"


def test_connect_waits_while_the_listen_backlog_is_full(tmp_path: object) -> None:
    """A Unix connect() with a timeout fails at once with EAGAIN on a full backlog; the
    VMM side retries until its timeout instead of failing (or raising BlockingIOError)."""
    path = os.path.join(str(tmp_path), "fc.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)  # the backlog is full now
    uffd = Userfaultfd.open(Feature.EVENT_REMOVE)
    try:
        with pytest.raises(HandlerError) as e:
            connect_and_send(path, _regions(1), uffd, timeout=0.2)
        assert "backlog" in str(e.value)
        got: list[socket.socket] = []
        t = threading.Thread(target=lambda: got.append(
            connect_and_send(path, _regions(1), uffd, timeout=30)))
        t.start()
        first, _ = listener.accept()  # room again: the waiting connect goes through
        t.join(30)
        assert len(got) == 1
        second, _ = listener.accept()
        hs = receive_handshake(second, FILE, timeout=10)
        os.close(hs.uffd_fd)
        assert hs.regions == tuple(_regions(1))
        for s in (first, second, *got):
            s.close()
    finally:
        uffd.close()
        filler.close()
        listener.close()


def test_a_second_fd_is_refused_as_it_arrives() -> None:
    """Fds sent with an unfinished handshake are refused at once, not kept until the
    timeout: a peer sending fds with every byte would fill the server's fd table."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        send_with_fds(a, b"[", [r1])
        send_with_fds(a, b" ", [r2])  # the handshake is nowhere near complete
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(HandshakeError) as e:
            receive_handshake(b, FILE, timeout=600)
        assert e.value.field == "uffd" and "exactly one" in str(e.value)
        assert len(os.listdir("/proc/self/fd")) == before  # both received fds closed
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        a.close()
        b.close()
