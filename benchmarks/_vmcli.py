"""Drive `pagein vm run` / `pagein vm restore` as a user does: a child process whose stdin
takes request lines and whose stdout gives answers; shared by the benchmarks.

Also the hugetlb pool for a benchmark run: raised by what is missing, given back after.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence

from pagein.sys.mapping import hugetlb_free_pages

POOL = "/proc/sys/vm/nr_hugepages"


class VmProcess:
    """One `pagein vm ...` child, optionally pinned to ``cpus`` (taskset)."""

    def __init__(self, args: Sequence[str], cpus: Sequence[int] | None = None) -> None:
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        self.proc = subprocess.Popen([*pin, sys.executable, "-m", "pagein", "vm", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._buf = b""

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def read_line(self, timeout: float) -> str:
        """The next answer line. Reads the pipe's fd itself: a buffered ``readline``
        after ``select`` would keep lines that arrived together in its buffer, where
        ``select`` never sees them (a burst's answers often come several at once)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], timeout)[0]:
                raise SystemExit(f"no answer within {timeout} s from {self.proc.args!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SystemExit(f"{self.proc.args!r} ended: {self.stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()[-2000:]

    def kill(self) -> None:
        """Stop the child (a failed measurement must not leave a guest holding pages)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float) -> None:
        """End of input (the guest quits); fail loudly on a non-zero exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        err = self.stderr()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        if rc != 0:
            raise SystemExit(f"{self.proc.args!r} exited {rc}: {err}")


@contextlib.contextmanager
def hugetlb_pages(n: int) -> Iterator[None]:
    """At least ``n`` free 2 MiB pages while the block runs; what was added is taken
    back after (the pool is machine-wide: others' pages are left alone)."""
    with open(POOL) as f:
        before = int(f.read())
    short = n - hugetlb_free_pages()
    added = 0
    if short > 0:
        with open(POOL, "w") as f:
            f.write(str(before + short))
        with open(POOL) as f:
            added = int(f.read()) - before
        if hugetlb_free_pages() < n:
            _give_back(added)
            raise SystemExit(f"cannot get {n} free 2 MiB pages (vm.nr_hugepages)")
    try:
        yield
    finally:
        _give_back(added)


def _give_back(added: int) -> None:
    if added > 0:
        with open(POOL) as f:
            now = int(f.read())
        with open(POOL, "w") as f:
            f.write(str(max(0, now - added)))


def pinned_to(cpu: int | None) -> list[int] | None:
    """``[cpu]``, or None (unpinned); checks the CPU exists here."""
    if cpu is None:
        return None
    if cpu not in os.sched_getaffinity(0):
        raise SystemExit(f"CPU {cpu} is not available to this process")
    return [cpu]
