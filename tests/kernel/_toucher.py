"""Fault on userfaultfd-registered memory from another process, for tests.

A :class:`Toucher` is a forked child that maps a region, creates its *own* uffd (so
the uffd acts on the child's address space, as a VMM's does), registers the region and
sends the uffd to the test over a socketpair with SCM_RIGHTS: Firecracker's
arrangement. The child then runs commands the test sends (read, write, madvise, mremap,
munmap, fork, many threads reading at once) and replies with the result. Memory is
touched with ``ctypes.memmove`` (GIL released), so the child may also use threads.

While a command is blocked on a fault, the test serves it with :func:`serve`::

    with Toucher.spawn(4 * PAGE_SIZE) as t:
        t.send("read", 0, PAGE_SIZE)
        data = serve(t, copy_from(src, t.address))

Every wait has a timeout; :meth:`Toucher.close` kills the child if it is still there.
Other test modules may reuse this; keep it small.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import pickle
import random
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from pagein._abi import libc
from pagein._abi.mman import Advice
from pagein.sys.fdpass import recv_with_fds, send_with_fds
from pagein.sys.mapping import PAGE_SIZE, Mapping, Memfd
from pagein.sys.uffd import (
    Event,
    Feature,
    Fork,
    PageFault,
    RegisterMode,
    Userfaultfd,
)

Handler = Callable[[Userfaultfd, Event], None]
TIMEOUT = 10.0


class ChildDied(RuntimeError):
    """The toucher exited (``status`` is the raw waitpid status)."""

    def __init__(self, status: int) -> None:
        self.status = status
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        self.signal = sig
        super().__init__(f"toucher died: status=0x{status:x} signal={sig}")


def pattern(length: int, seed: int = 1) -> bytearray:
    """Return ``length`` reproducible pseudo-random bytes."""
    return bytearray(random.Random(seed).randbytes(length))


@dataclass
class Toucher:
    """The parent's handle on a toucher child."""

    pid: int
    sock: socket.socket
    uffd: Userfaultfd
    address: int
    length: int
    spare: int  # an unregistered region of the same length (mremap target, move source)
    ioctls: frozenset[int]
    extra: list[Userfaultfd] = field(default_factory=list)  # uffds from Fork events
    _status: int | None = None

    @classmethod
    def spawn(cls, length: int, *, kind: str = "anon", memfd: Memfd | None = None,
              features: Feature = Feature.NONE, mode: RegisterMode = RegisterMode.MISSING,
              register_length: int | None = None) -> Toucher:
        """Fork a toucher with ``length`` bytes of ``kind`` memory registered in ``mode``.

        ``kind``: ``anon`` (private), ``shared`` (shared anonymous), ``hugetlb`` (private
        2 MiB pages) or ``memfd`` (a shared mapping of ``memfd``, inherited by fork).
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            parent.close()
            _child_main(child, length, kind, memfd, features, mode, register_length)
        child.close()
        try:
            parent.settimeout(TIMEOUT)
            got = recv_with_fds(parent, 4096, 1)
            if not got.fds:
                raise RuntimeError(f"toucher failed to start: {pickle.loads(got.data)!r}")
            address, spare, ioctls = pickle.loads(got.data)
            uffd = Userfaultfd.adopt(got.fds[0], features=features)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            parent.close()
            raise
        return cls(pid, parent, uffd, address, length, spare, ioctls)

    def send(self, *command: Any) -> None:
        """Ask the child to run ``command`` (see ``_run`` for the list)."""
        self.sock.send(pickle.dumps(command))

    def reply(self, timeout: float = TIMEOUT) -> Any:
        """Wait for the next reply without serving faults."""
        return serve(self, None, timeout)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """Wait for the child to exit and return its raw status."""
        deadline = time.monotonic() + timeout
        while self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = status
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"toucher {self.pid} did not exit")
            time.sleep(0.005)  # polling an exit status, not synchronising
        return self._status

    def close(self) -> None:
        """Kill the child (if alive), reap it, close the socket and every uffd."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._status = os.waitpid(self.pid, 0)[1]
        self.sock.close()
        for u in [self.uffd, *self.extra]:
            u.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(t: Toucher, handler: Handler | None, timeout: float = TIMEOUT) -> Any:
    """Serve ``t``'s uffds with ``handler`` until the child replies; return the reply.

    Fork events add the child's new uffd to the loop (and to ``t.extra``) before the
    handler sees them. Raises :class:`ChildDied` if the child dies, ``TimeoutError``
    after ``timeout`` seconds, and re-raises an error the child reported.
    """
    sel = selectors.DefaultSelector()
    sel.register(t.sock, selectors.EVENT_READ)
    if handler is not None:
        for u in [t.uffd, *t.extra]:
            sel.register(u, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"toucher {t.pid} did not reply within {timeout}s")
            for key, _ in sel.select(left):
                if key.fileobj is t.sock:
                    return _take_reply(t)
                assert isinstance(key.fileobj, Userfaultfd) and handler is not None
                for ev in key.fileobj.read_events():
                    if isinstance(ev, Fork):
                        t.extra.append(ev.uffd)
                        sel.register(ev.uffd, selectors.EVENT_READ)
                    handler(key.fileobj, ev)
    finally:
        sel.close()


def _take_reply(t: Toucher) -> Any:
    data = t.sock.recv(1 << 20)
    if not data:
        t._status = os.waitpid(t.pid, 0)[1]
        raise ChildDied(t._status)
    kind, value = pickle.loads(data)
    if kind == "err":
        raise RuntimeError(f"toucher command failed: {value}")
    return value


def copy_from(source: bytearray, base: int, block: int = PAGE_SIZE) -> Handler:
    """A handler that fills each faulting block from ``source`` (``base`` maps to 0)."""
    src = libc.buffer_address(source)

    def handle(uffd: Userfaultfd, ev: Event, _keep: bytearray = source) -> None:
        # ``_keep`` holds the buffer alive as long as the handler: ``src`` points into it.
        if isinstance(ev, PageFault):
            start = (ev.address - base) // block * block
            uffd.copy(base + start, src + start, block)

    return handle


def fault_waiters(pid: int) -> int:
    """Count the threads of ``pid`` asleep in ``handle_userfault`` (per /proc wchan)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                n += f.read().strip() == "handle_userfault"
        except FileNotFoundError:
            continue
    return n


def wait_for_fault_waiters(pid: int, n: int, timeout: float = TIMEOUT) -> None:
    """Poll /proc until ``n`` threads of ``pid`` wait on a fault (raise on timeout)."""
    deadline = time.monotonic() + timeout
    while fault_waiters(pid) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {fault_waiters(pid)} of {n} threads are faulting")
        time.sleep(0.002)  # polling kernel state that has no fd to wait on


# --- the child -----------------------------------------------------------------------


def _child_main(sock: socket.socket, length: int, kind: str, memfd: Memfd | None,
                features: Feature, mode: RegisterMode,
                register_length: int | None) -> None:  # pragma: no cover
    status = 0
    try:
        faulthandler.disable()  # a SIGBUS on purpose (poison) should not dump a traceback
        region = _map(length, kind, memfd)
        spare = _map(length, kind, memfd)
        uffd = Userfaultfd.open(features)
        ioctls = uffd.register(region.address, register_length or length, mode)
        send_with_fds(sock, pickle.dumps((region.address, spare.address, ioctls)),
                      [uffd.fileno()])
        # The test owns the uffd from now on: closing it there must end registration.
        uffd.close()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            command = pickle.loads(data)
            if command[0] == "exit":
                break
            try:
                sock.send(pickle.dumps(("ok", _run(sock, region, spare, command))))
            except Exception:
                sock.send(pickle.dumps(("err", traceback.format_exc(limit=3))))
    except BaseException:
        status = 3
        with contextlib.suppress(OSError):
            sock.send(pickle.dumps(traceback.format_exc(limit=3)))
    finally:
        os._exit(status)


def _map(length: int, kind: str, memfd: Memfd | None) -> Mapping:  # pragma: no cover
    if kind == "memfd":
        assert memfd is not None
        return memfd.map(length=length)
    return Mapping.anonymous(length, shared=kind == "shared", hugetlb=kind == "hugetlb")


def _run(sock: socket.socket, region: Mapping, spare: Mapping,
         command: tuple[Any, ...]) -> Any:  # pragma: no cover
    """Run one command in the child; every memory access releases the GIL."""
    op, *args = command
    base = region.address
    if op == "read":
        off, n = args
        return libc.read_memory(base + off, n)
    if op == "digest":
        off, n = args
        return hashlib.sha256(libc.read_memory(base + off, n)).hexdigest()
    if op == "write":
        off, data = args
        libc.write_memory(base + off, data)
        return None
    if op == "spare_write":
        off, data = args
        libc.write_memory(spare.address + off, data)
        return None
    if op == "spare_read":
        off, n = args
        return libc.read_memory(spare.address + off, n)
    if op == "madvise":
        off, n, advice = args
        region.madvise(Advice(advice), off, n)
        return None
    if op == "mremap":  # move the whole region onto the spare one
        region.move_to(spare.address)
        spare.release()
        return region.address
    if op == "munmap":
        off, n = args
        if libc.munmap(base + off, n) != 0:
            raise OSError(libc.get_errno(), "munmap")
        return None
    if op == "fork_read":
        return _fork_read(sock, base + args[0], args[1])
    if op == "threads_read":
        return _threads_read(base, args[0], args[1])
    raise ValueError(f"unknown toucher command {op!r}")


def _fork_read(sock: socket.socket, address: int, n: int) -> Any:  # pragma: no cover
    pid = os.fork()
    if pid == 0:
        try:
            sock.send(pickle.dumps(("ok", ("grandchild", os.getpid(),
                                           libc.read_memory(address, n)))))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return ("forked", pid, status)


def _threads_read(base: int, offsets: list[int], n: int) -> list[bytes]:  # pragma: no cover
    out: list[bytes] = [b""] * len(offsets)

    def one(i: int) -> None:
        out[i] = libc.read_memory(base + offsets[i], n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(offsets))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out
