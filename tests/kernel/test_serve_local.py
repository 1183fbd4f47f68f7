"""restore_lazily: this process's memory filled by a handler process; failures are loud."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pagein.errors import HandlerError, SnapshotFormatError
from pagein.serve.local import restore_lazily

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import blocked_in_userfault, hugepages, make_snapshot, wait_for

pytestmark = pytest.mark.kernel

SIZE = 2 << 20
P = 4096


@pytest.mark.parametrize("strategy", ["on-demand", "readahead", "populate-all"])
def test_restore_lazily_every_byte_from_threads(tmp_path: Path, strategy: str) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, SIZE)
    with restore_lazily(path, strategy=strategy) as r:
        assert r.mapping.length == SIZE
        out = ctypes.create_string_buffer(SIZE)

        def touch(start: int) -> None:  # memmove releases the GIL while it faults
            for off in range(start, SIZE, 2 * P):
                ctypes.memmove(ctypes.addressof(out) + off, r.mapping.address + off, P)

        ts = [threading.Thread(target=touch, args=(s,)) for s in (0, P)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out.raw == data
        stats = r.stats()
        assert stats.pages == SIZE // P
        if strategy == "on-demand":  # every hole page is a zero page
            assert stats.zero_pages == SIZE // P // 8
        assert stats.bytes_copied == SIZE - stats.zero_pages * P
        pid = r.handler_pid
    assert r.stats() == stats  # the last statistics stay readable after close
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_handler_death_is_loud(tmp_path: Path) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, SIZE)
    r = restore_lazily(path)
    assert r.mapping.read(0, 4) == data[:4]
    os.kill(r.handler_pid, signal.SIGKILL)
    wait_for(lambda: r._handler.proc.poll() is not None, 10, "the handler to die")
    with pytest.raises(HandlerError, match="exited with status -9"):
        r.check()
    with pytest.raises(HandlerError, match="exited with status -9"):
        r.close()
    assert r.mapping.closed


def test_handler_death_blocks_touches_never_zeros(tmp_path: Path) -> None:
    """In a child process: after the handler dies, touching a missing page blocks."""
    path = str(tmp_path / "mem.snap")
    make_snapshot(path, SIZE)
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pagein.serve.local import restore_lazily
        r = restore_lazily({path!r})
        first = r.mapping.read(0, 8)
        os.kill(r.handler_pid, signal.SIGKILL)
        print("killed", flush=True)
        data = r.mapping.read({SIZE // 2}, {P})
        print("READ", "zeros" if not any(data) else "data", flush=True)
    """)
    # The child is SIGKILLed, so it cannot remove its handler directory: keep it in tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "killed"
        wait_for(lambda: blocked_in_userfault(child.pid), 20, "the child to block in a fault")
        assert child.poll() is None
    finally:
        child.kill()
        out, _ = child.communicate(timeout=10)
    assert "READ" not in out


def test_size_not_a_multiple_of_the_page_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.snap"
    path.write_bytes(b"\1" * (P * 3))
    with pytest.raises(SnapshotFormatError, match="not a multiple of the page size 2097152"):
        restore_lazily(str(path), hugetlb=True)


@pytest.mark.hugetlb
def test_restore_lazily_on_hugepages(tmp_path: Path) -> None:
    path = str(tmp_path / "mem.snap")
    data = make_snapshot(path, 4 << 20)
    with hugepages(2) as ok:
        if not ok:
            pytest.skip("needs 2 free 2 MiB pages: raise vm.nr_hugepages")
        _restore_on_hugepages(path, data)


def _restore_on_hugepages(path: str, data: bytes) -> None:
    with restore_lazily(path, hugetlb=True) as r:
        out = ctypes.create_string_buffer(4 << 20)
        ctypes.memmove(out, r.mapping.address, 4 << 20)
        assert out.raw == data
        assert r.stats().pages == 2
