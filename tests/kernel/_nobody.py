"""Unprivileged peers for the access tests: each drops to uid/gid ``nobody`` (65534) with
os.setgid/os.setuid before acting, after importing what it needs as root.

  reader    a hostile VMM: its own user-mode-only uffd (what an unprivileged user can
            create), connect, send a valid handshake, touch the pages; reports whether it
            could connect, whether the server closed on it, how many pages arrived
  listen    a fake handler: listen, accept one connection, report the bytes and fds sent
  pidreuse  connect, fork a child that keeps the socket, exit when told; the child sends
            a bad handshake (with a uffd) when told, and reports when the server closed it
  serve     ``pagein serve ARGS...`` as nobody (a handler the restore must be told to trust)

The interpreter lives under /root, which nobody cannot read: everything a command needs
is imported before the privileges are dropped.

Each prints JSON lines; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import select
import socket
import sys
import threading
import time

from pagein.serve.firecracker import Region, encode_regions
from pagein.sys.fdpass import recv_with_fds, send_with_fds
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd

NOBODY = 65534
WAIT_S = 20.0


def drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def say(**doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closed ``sock`` within ``timeout`` (EOF, or a reset)."""
    if not select.select([sock], [], [], timeout)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def cmd_reader(args: argparse.Namespace) -> int:
    size = args.size
    mem = Mapping.anonymous(size)
    pagemap = Pagemap()
    drop_to_nobody()
    uffd = Userfaultfd.open(Feature.EVENT_REMOVE, user_mode_only=True)
    uffd.register(mem.address, size, RegisterMode.MISSING)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as e:
        say(connected=False, error=os.strerror(e.errno or 0))
        return 0
    # A refused peer may find the connection closed before it can even send.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        send_with_fds(sock, encode_regions([Region(mem.address, size, 0)]), [uffd.fileno()])
    done = threading.Event()
    digest: list[str] = []

    def touch() -> None:  # memmove releases the GIL; a fault nobody serves blocks here
        buf = ctypes.create_string_buffer(size)
        ctypes.memmove(buf, mem.address, size)
        digest.append(hashlib.sha256(buf.raw).hexdigest())
        done.set()

    threading.Thread(target=touch, daemon=True).start()
    closed = False
    deadline = time.monotonic() + args.wait
    while not done.is_set() and not closed and time.monotonic() < deadline:
        closed = _closed_within(sock, 0.05)
    present = pagemap.summary(mem.address, size).present
    refused_again = 0
    for _ in range(args.repeat):  # connect again and again: each one refused, closed
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(args.socket)
        refused_again += _closed_within(s, WAIT_S)
        s.close()
    say(connected=True, closed=closed, touched=done.is_set(), pages_present=present,
        sha256=digest[0] if digest else None, refused_again=refused_again)
    os._exit(0)  # a touch thread may still be blocked on a page nobody serves


def cmd_listen(args: argparse.Namespace) -> int:
    drop_to_nobody()
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(args.socket)
    os.chmod(args.socket, 0o666)
    lst.listen(1)
    say(listening=True)
    if not select.select([lst], [], [], WAIT_S)[0]:
        say(accepted=False)
        return 1
    conn, _ = lst.accept()
    nbytes, nfds = 0, 0
    while select.select([conn], [], [], WAIT_S)[0]:
        got = recv_with_fds(conn, 1 << 16)
        for fd in got.fds:
            os.close(fd)
        nbytes += len(got.data)
        nfds += len(got.fds)
        if not got.data:
            break
    say(accepted=True, bytes=nbytes, fds=nfds)
    return 0


def cmd_pidreuse(args: argparse.Namespace) -> int:
    drop_to_nobody()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    say(pid=os.getpid())
    if os.fork() == 0:  # the child keeps the connection the parent made
        os.close(args.exit_fd)
        if not select.select([args.go_fd], [], [], 3 * WAIT_S)[0]:
            os._exit(1)
        # A bad handshake from a VMM (it holds a uffd: the kill policy applies to it).
        uffd = Userfaultfd.open(Feature.EVENT_REMOVE, user_mode_only=True)
        send_with_fds(sock, b"[]", [uffd.fileno()])
        say(sent=True)
        say(closed=_closed_within(sock, WAIT_S))
        os._exit(0)
    sock.close()
    os.close(args.go_fd)
    select.select([args.exit_fd], [], [], 3 * WAIT_S)
    return 0


def cmd_serve(argv: list[str]) -> int:
    import importlib

    from pagein.cli.main import build_parser, main

    build_parser(["serve"])  # imports the serve command and everything it uses
    for name in ("pagein.serve.served", "pagein.serve.server", "pagein.serve.worker",
                 "pagein.serve.native", "pagein.serve.install", "pagein.snapshot.open",
                 "pagein.snapshot.raw", "http.server", "json.decoder"):
        importlib.import_module(name)
    drop_to_nobody()
    return main(argv)


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return cmd_serve(sys.argv[1:])
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reader")
    r.add_argument("--socket", required=True)
    r.add_argument("--size", type=int, default=16 * PAGE_SIZE)
    r.add_argument("--wait", type=float, default=WAIT_S, help="seconds to wait for pages")
    r.add_argument("--repeat", type=int, default=0, help="connect this many more times")
    r.set_defaults(fn=cmd_reader)
    li = sub.add_parser("listen")
    li.add_argument("--socket", required=True)
    li.set_defaults(fn=cmd_listen)
    pr = sub.add_parser("pidreuse")
    pr.add_argument("--socket", required=True)
    pr.add_argument("--exit-fd", type=int, required=True)
    pr.add_argument("--go-fd", type=int, required=True)
    pr.set_defaults(fn=cmd_pidreuse)
    args = p.parse_args()
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
