"""Test harness for ``pagein serve``: snapshots with known content, the server and the
Firecracker-faithful client (``tests/fcclient.py``) as real processes, with timeouts."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pagein.sys.mapping import hugetlb_free_pages
from pagein.sys.poll import wait_readable
from pagein.sys.process import live_children_named

FCCLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fcclient.py")
PAGE = 4096


def make_snapshot(path: str, size: int, *, hole_every: int = 8, seed: int = 7) -> bytes:
    """Write ``size`` bytes of random pages to ``path``; every ``hole_every``-th page is a hole.

    Returns the file's content (holes read as zeros).
    """
    rng = random.Random(seed)
    chunk = 64 << 20  # randbytes takes at most 2**31 bits at once
    data = bytearray(b"".join(rng.randbytes(min(chunk, size - o)) for o in range(0, size, chunk)))
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // PAGE):
            if hole_every and i % hole_every == hole_every - 1:
                data[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
                continue
            f.seek(i * PAGE)
            f.write(data[i * PAGE:(i + 1) * PAGE])
    return bytes(data)


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: str
    stats_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stats(self) -> dict[str, object]:
        """The stats file as the server last wrote it."""
        with open(self.stats_path) as f:
            doc: dict[str, object] = json.load(f)
        return doc

    def fresh_stats(self, timeout: float = 10) -> dict[str, object]:
        """Ask the server for its counters now (SIGUSR1) and read what it writes."""
        if os.path.exists(self.stats_path):
            os.unlink(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: os.path.exists(self.stats_path), timeout, "the SIGUSR1 stats file")
        return self.stats()

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM the server and wait (SIGKILL after ``timeout``); return its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: str, mem_file: str, *extra: str, timeout: float = 20,
                 source: str | None = None, env: dict[str, str] | None = None,
                 umask: int = -1, nofile: tuple[int, int] | None = None) -> ServerProc:
    """Start ``python -m pagein serve`` and wait until it listens (``--ready-fd``).

    Serves ``mem_file`` (``--mem-file``), or ``source`` (``--source``) when given;
    ``umask`` is the server's (-1: this process's); ``nofile`` its (soft, hard)
    RLIMIT_NOFILE, set with prlimit(1).
    """
    sock = os.path.join(tmp, "fc.sock")
    log_path = os.path.join(tmp, "server.log")
    stats = os.path.join(tmp, "stats.json")
    r, w = os.pipe()
    what = ["--source", source] if source else ["--mem-file", mem_file]
    # No drain unless a test asks for one: stop() means stop (tests of SIGTERM draining
    # pass --drain-timeout themselves).
    drain = [] if "--drain-timeout" in extra else ["--drain-timeout", "0"]
    cmd = [sys.executable, "-m", "pagein", "-v", "serve", "--socket", sock, *what,
           "--stats-json", stats, "--ready-fd", str(w), *drain, *extra]
    if nofile is not None:
        cmd = ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", *cmd]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, pass_fds=(w,), env=env,
                                umask=umask)
    os.close(w)
    try:
        ready = wait_readable([r], timeout) and os.read(r, 16)
    finally:
        os.close(r)
    server = ServerProc(proc, sock, log_path, stats)
    if not ready:
        server.stop()
        raise RuntimeError(f"pagein serve did not start: {server.log()}")
    return server


def client(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start the Firecracker-faithful client with ``args``."""
    return subprocess.Popen([sys.executable, FCCLIENT, *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, dict[str, object]]:
    """Wait for a client; return its status and its last JSON line (kill it on timeout)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client timed out; stderr: {err[-2000:]}") from None
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result: dict[str, object] = json.loads(lines[-1]) if lines else {"stderr": err[-2000:]}
    return proc.returncode, result


def touch_args(server: ServerProc, mem_file: str, regions: Sequence[tuple[int, int]],
               *extra: str) -> list[str]:
    layout = ",".join(f"{off}:{size}" for off, size in regions)
    return ["touch", "--socket", server.socket_path, "--mem-file", mem_file,
            "--regions", layout, *extra]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true (kernel state has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def blocked_in_userfault(pid: int) -> bool:
    """Whether some thread of ``pid`` sleeps in ``handle_userfault`` (a fault nobody serves)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().strip() == "handle_userfault":
                    return True
        except FileNotFoundError:
            continue
    return False


def _hugepages_free() -> int:
    return hugetlb_free_pages()  # free and not reserved


@contextlib.contextmanager
def hugepages(n: int) -> Iterator[bool]:
    """Make sure ``n`` (plus one spare) free 2 MiB pages exist while the block runs
    (raising vm.nr_hugepages by the shortfall as root) and take back what was added
    afterwards.

    Yields whether enough pages are free. The pool is machine-wide and shared with other
    test runs: only the shortfall is added, and afterwards exactly that many pages are
    taken away again (not the old value written back, which would drop pages another run
    added meanwhile).
    """
    knob = "/proc/sys/vm/nr_hugepages"
    # One spare page: a hugetlb UFFDIO_COPY can need a transient page besides the one it
    # installs; with the pool exactly full the last copy fails with ENOMEM.
    shortfall = n + 1 - _hugepages_free()
    if shortfall <= 0:
        yield True
        return
    try:
        with open(knob) as f:
            before = int(f.read())
        with open(knob, "w") as f:
            f.write(str(before + shortfall))
        with open(knob) as f:
            added = int(f.read()) - before  # the kernel may find fewer pages
    except OSError:
        yield False
        return
    try:
        yield _hugepages_free() >= n
    finally:
        _give_back(added)


def _give_back(added: int) -> None:
    """Take ``added`` pages out of the pool again (see :func:`hugepages`)."""
    if added > 0:
        _write("nr_hugepages", max(0, _read("nr_hugepages") - added))


@contextlib.contextmanager
def hugetlb_free_exactly(n: int) -> Iterator[None]:
    """Leave exactly ``n`` 2 MiB pages free and unreserved (no overcommit) for the block.

    Pages other processes hold or reserve stay theirs: the pool is resized around them
    (nr_hugepages = total - available + n), and afterwards resized back by the same
    difference, so another run's changes meanwhile survive."""
    total, over = _read("nr_hugepages"), _read("nr_overcommit_hugepages")
    _write("nr_overcommit_hugepages", 0)
    try:
        _write("nr_hugepages", total - _hugepages_free() + n)
        changed = _read("nr_hugepages") - total
        try:
            if _hugepages_free() != n:
                raise AssertionError(f"cannot leave exactly {n} free 2 MiB pages "
                                     f"({_hugepages_free()} free)")
            yield
        finally:
            _write("nr_hugepages", max(0, _read("nr_hugepages") - changed))
    finally:
        _write("nr_overcommit_hugepages", over)


def serving_workers(server_pid: int) -> set[int]:
    """The pids of a ``pagein serve``'s serving workers: its live children named
    ``pagein-worker<N>`` (the zygote that forks them is ``pagein-zygote``, a spare
    waiting to be put to work ``pagein-spare``)."""
    return live_children_named(server_pid, "pagein-worker")


_POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def _read(name: str) -> int:
    with open(f"{_POOL}/{name}") as f:
        return int(f.read())


def _write(name: str, value: int) -> None:
    with open(f"{_POOL}/{name}", "w") as f:
        f.write(str(value))


@contextlib.contextmanager
def empty_hugetlb_pool() -> Iterator[None]:
    """Leave no free 2 MiB page and no overcommit for the block; restore both after.

    The pool keeps the pages others use (nr_hugepages = total - free), so a test that
    holds pages elsewhere keeps them."""
    total, over = _read("nr_hugepages"), _read("nr_overcommit_hugepages")
    try:
        _write("nr_overcommit_hugepages", 0)
        _write("nr_hugepages", total - _read("free_hugepages"))
        assert _read("free_hugepages") == 0
        yield
    finally:
        _write("nr_hugepages", total)
        _write("nr_overcommit_hugepages", over)
