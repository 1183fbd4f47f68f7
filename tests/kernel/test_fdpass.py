"""SCM_RIGHTS and SO_PEERCRED on real Unix sockets, and a uffd served by the process it
was passed to (the ioctls act on the creator's memory)."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

import pytest
from _toucher import pattern

from pagein._abi import libc
from pagein.sys.fdpass import peer_credentials, recv_with_fds, send_with_fds
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import Filled, PageFault, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel
N = 16
P = PAGE_SIZE


def _server_child(sock: socket.socket, src: bytearray, base: int) -> None:  # pragma: no cover
    """Receive a uffd and serve N faults from ``src``, then report how many."""
    status = 1
    try:
        got = recv_with_fds(sock, 64, 1)
        (fd,) = got.fds
        with Userfaultfd.adopt(fd) as u:
            served = 0
            while served < N and select.select([u], [], [], 10.0)[0]:
                for ev in u.read_events():
                    assert isinstance(ev, PageFault)
                    off = ev.address - base
                    assert u.copy(ev.address, libc.buffer_address(src) + off, P) == Filled(P)
                    served += 1
        sock.send(str(served).encode())
        status = 0
    finally:
        os._exit(status)


def test_uffd_sent_to_another_process_serves_the_creators_faults() -> None:
    src = pattern(N * P)
    with Mapping.anonymous(N * P) as m, Userfaultfd.open() as u:
        u.register(m.address, N * P, RegisterMode.MISSING)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            ours.close()
            _server_child(theirs, src, m.address)
        theirs.close()
        try:
            assert send_with_fds(ours, b"uffd", [u.fileno()]) == 4
            # This process faults (GIL released in memmove); the child fills our memory.
            data = m.read(0, N * P)
            ours.settimeout(10.0)
            served = ours.recv(16)
        finally:
            _, status = os.waitpid(pid, 0)
            ours.close()
    assert data == bytes(src) and served == str(N).encode() and status == 0


def test_peer_credentials_name_the_connecting_process(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - connect, send two fds, wait for close
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                    c.connect(path)
                    r, w = os.pipe()
                    os.write(w, b"through the pipe")
                    send_with_fds(c, b"hello", [r, w])
                    c.recv(1)
            finally:
                os._exit(0)
        try:
            listener.settimeout(10.0)
            conn, _ = listener.accept()
            with conn:
                cred = peer_credentials(conn)
                got = recv_with_fds(conn, 64, 4)
                assert (cred.pid, cred.uid, cred.gid) == (pid, os.getuid(), os.getgid())
                assert got.data == b"hello" and len(got.fds) == 2 and not got.truncated
                r, w = got.fds
                assert not os.get_inheritable(r)  # MSG_CMSG_CLOEXEC
                assert os.read(r, 64) == b"through the pipe"
                os.close(r)
                os.close(w)
        finally:
            os.waitpid(pid, 0)


def test_recv_reports_truncated_fds_and_returns_the_ones_that_arrived() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        send_with_fds(a, b"x", [r, w])
        got = recv_with_fds(b, 64, 1)
        assert got.truncated and len(got.fds) == 1
        os.close(got.fds[0])
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)
