"""Messages that must name what really happened: a blocking uffd, the real number of fds
sent, a handler killed while it starts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagein.errors import HandlerError
from pagein.serve.handler import HandlerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import (
    ServerProc,
    blocked_in_userfault,
    client,
    finish,
    make_snapshot,
    start_server,
    touch_args,
    wait_for,
)

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
PAYLOAD = '[{"base_host_virt_addr": BASE, "size": 65536, "offset": 0}]'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("messages")
    snap = str(tmp / "mem.snap")
    make_snapshot(snap, SIZE)
    s = start_server(str(tmp), snap, "--on-bad-handshake", "close")
    yield s
    s.stop()


def _refusal(server: ServerProc, *args: str) -> str:
    c = client("raw", "--socket", server.socket_path, "--payload", PAYLOAD, *args)
    rc, res = finish(c, timeout=20)
    assert rc == 3 and res == {"closed": True}, (rc, res)  # closed, not killed
    lines = [ln for ln in server.log().splitlines() if f"vm pid={c.pid}: bad handshake" in ln]
    assert len(lines) == 1, server.log()[-3000:]
    return lines[0]


def test_a_blocking_uffd_is_named_as_blocking(server: ServerProc) -> None:
    line = _refusal(server, "--blocking")
    assert "the userfaultfd is blocking: the VMM must create it with O_NONBLOCK" in line
    assert "never called UFFDIO_API" not in line


def test_a_uffd_made_blocking_after_the_handshake_is_named(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    s = start_server(str(tmp_path), snap)
    c = client(*touch_args(s, snap, [(0, SIZE)], "--threads", "1",
                           "--blocking-after-handshake"), stdin=subprocess.PIPE)
    assert c.stdin is not None
    try:
        wait_for(lambda: f"vm pid={c.pid}: serving 1 regions" in s.log(), 20, "the handshake")
        c.stdin.write("\n")
        c.stdin.flush()
        wait_for(lambda: "serving stopped" in s.log(), 20, "the session to stop")
        wait_for(lambda: blocked_in_userfault(c.pid), 20, "the client to block")
    finally:
        c.kill()
        c.communicate()
        s.stop()
    (line,) = [ln for ln in s.log().splitlines() if "serving stopped" in ln]
    assert "the userfaultfd is blocking: the VMM must create it with O_NONBLOCK" in line
    assert "UFFDIO_API" not in line


@pytest.mark.parametrize("extra", [8, 39])
def test_the_real_number_of_fds_is_reported(server: ServerProc, extra: int) -> None:
    line = _refusal(server, "--extra-fds", str(extra))
    assert f"bad handshake field uffd='{extra + 1} fds': expected exactly one" in line


def test_a_handler_killed_while_starting_says_so(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A "python" that closes the ready pipe (as a dying handler's exit does), lingers a
    # moment, then is SIGKILLed: the EOF comes before its exit status can be reaped.
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import os, signal, sys, time\n"
                    "os.close(int(sys.argv[sys.argv.index('--ready-fd') + 1]))\n"
                    "time.sleep(0.3)\n"
                    "os.kill(os.getpid(), signal.SIGKILL)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(fake))
    mem = tmp_path / "mem.snap"
    make_snapshot(str(mem), SIZE)
    opts = HandlerProcess.options_for_one_vm(str(mem), str(tmp_path))
    with pytest.raises(HandlerError) as info:
        HandlerProcess.start(opts, str(tmp_path), timeout=30)
    msg = str(info.value)
    assert "exited with status -9 (killed by SIGKILL) during start" in msg, msg
    assert "did not start within" not in msg
    assert not os.path.exists(opts.socket_path)
