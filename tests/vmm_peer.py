"""A Firecracker-style VMM inside the test process: its own guest memory and uffd,
connected to ``pagein serve`` (a separate process) over the handler protocol.

Cheaper than one ``fcclient.py`` process per VM, so a test can hold a thousand VMs:
each :class:`Peer` owns a small anonymous mapping registered MISSING on a uffd with
``UFFD_FEATURE_EVENT_REMOVE``, and the socket it sent them over. Reading guest memory
goes through ``ctypes.memmove`` (the GIL is released while the handler process fills
the page, so the test's other threads run on).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
from dataclasses import dataclass

from pagein.serve.firecracker import Region, connect_and_send
from pagein.serve.session import STATS_REQUEST
from pagein.sys.mapping import Mapping
from pagein.sys.poll import wait_readable
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

PAGE = 4096


@dataclass
class Peer:
    mapping: Mapping
    uffd: Userfaultfd
    sock: socket.socket
    offset: int  # where the guest memory starts in the memory file

    def read(self, page: int) -> bytes:
        """Copy guest page ``page`` out (faulting it in through the server)."""
        buf = ctypes.create_string_buffer(PAGE)
        ctypes.memmove(buf, self.mapping.address + page * PAGE, PAGE)
        return buf.raw

    def stats(self, timeout: float = 30) -> dict[str, object]:
        """Ask the serving session for this VM's counters (pagein's socket extension):
        an answer proves a worker serves this VM."""
        self.sock.sendall(STATS_REQUEST)
        line = b""
        while not line.endswith(b"\n"):
            if not wait_readable([self.sock], timeout):
                raise AssertionError(f"no stats answer within {timeout} s")
            got = self.sock.recv(65536)
            if not got:
                raise AssertionError("the server closed the VM's socket")
            line += got
        doc: dict[str, object] = json.loads(line)
        return doc

    def close(self) -> None:
        self.sock.close()
        self.mapping.close()
        self.uffd.close()


def connect(socket_path: str, size: int, offset: int = 0) -> Peer:
    """Restore ``size`` bytes of guest memory lazily from ``offset`` in the server's file."""
    uffd = Userfaultfd.open(Feature.EVENT_REMOVE, nonblocking=True)
    try:
        m = Mapping.anonymous(size, noreserve=True)
        uffd.register(m.address, size, RegisterMode.MISSING)
        sock = connect_and_send(socket_path, [Region(m.address, size, offset)], uffd)
    except BaseException:
        uffd.close()
        raise
    return Peer(m, uffd, sock, offset)


def raise_fd_limit(wanted: int) -> None:
    """Make sure this process may open ``wanted`` fds (soft limit up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
