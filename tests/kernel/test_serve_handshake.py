"""Each invalid handshake: one log line naming the field, the peer killed (or closed).

Only a peer that sent a userfaultfd is killed: one that sent no fd, another kind of fd
or nothing at all is not a VMM whose guest waits on the server (a health probe, a
monitoring connect, a second server asking whether the socket is in use).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import ServerProc, client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
GOOD = '"base_host_virt_addr": BASE, "size": 65536, "offset": 0'

# (case id, fcclient raw arguments, the field the server must name)
CASES = [
    ("not-an-array", ["--payload", '"hello"'], "payload"),
    ("not-json", ["--payload", "[{oops}]"], "payload"),
    ("no-regions", ["--payload", "[]"], "payload"),
    ("missing-base", ["--payload", '[{"size": 4096, "offset": 0}]'],
     "regions[0].base_host_virt_addr"),
    ("size-not-int", ["--payload", '[{"base_host_virt_addr": BASE, "size": "4k", "offset": 0}]'],
     "regions[0].size"),
    ("bad-page-size", ["--payload", "[{" + GOOD + ', "page_size": 8192}]'],
     "regions[0].page_size"),
    ("kib-disagrees", ["--payload", "[{" + GOOD + ', "page_size": 4096, "page_size_kib": 4}]'],
     "regions[0].page_size_kib"),
    ("unaligned-base", ["--payload", '[{"base_host_virt_addr": 4097, "size": 4096, '
                                     '"offset": 0}]'], "regions[0].base_host_virt_addr"),
    ("empty-region", ["--payload", '[{"base_host_virt_addr": BASE, "size": 0, "offset": 0}]'],
     "regions[0].size"),
    ("past-end-of-file", ["--payload", '[{"base_host_virt_addr": BASE, "size": 65536, '
                                       f'"offset": {SIZE}}}]'], "regions[0].offset"),
    ("overlap", ["--payload", "[{" + GOOD + '}, {"base_host_virt_addr": BASE, "size": 4096, '
                 '"offset": 65536}]'], "regions[1].base_host_virt_addr"),
    ("no-fd", ["--no-fd", "--payload", "[{" + GOOD + "}]"], "uffd"),
    ("not-a-uffd", ["--pipe-fd", "--payload", "[{" + GOOD + "}]"], "uffd"),
    ("no-event-remove", ["--no-remove", "--payload", "[{" + GOOD + "}]"], "uffd"),
    ("silent", ["--silent"], "handshake"),
]
# Peers that hold no uffd: closed and left alive under either policy.
NOT_VMMS = {"no-fd", "not-a-uffd", "silent"}


def _server_per_policy(tmp_path_factory: pytest.TempPathFactory, name: str,
                       timeout: str) -> Iterator[dict[str, ServerProc]]:
    """One server for each --on-bad-handshake policy, with ``--handshake-timeout``."""
    out: dict[str, ServerProc] = {}
    try:
        for policy in ("kill", "close"):
            tmp = tmp_path_factory.mktemp(f"{name}-{policy}")
            snap = str(tmp / "mem.snap")
            make_snapshot(snap, SIZE)
            out[policy] = start_server(str(tmp), snap, "--on-bad-handshake", policy,
                                       "--handshake-timeout", timeout)
        yield out
    finally:
        for s in out.values():
            s.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProc]]:
    yield from _server_per_policy(tmp_path_factory, "quick", "0.5")


def _raw(server: ServerProc, args: list[str]) -> subprocess.Popen[str]:
    return client("raw", "--socket", server.socket_path, *args)


@pytest.mark.parametrize(("case", "args", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_handshake_kills_peer_and_names_field(servers: dict[str, ServerProc], case: str,
                                                  args: list[str], field: str) -> None:
    server = servers["kill"]
    c = _raw(server, args)
    rc, res = finish(c, timeout=20)
    lines = [ln for ln in server.log().splitlines() if f"vm pid={c.pid}: bad handshake" in ln]
    if case in NOT_VMMS:
        assert rc == 3 and res == {"closed": True}, (case, rc, res)  # alive, closed
        if case == "silent":  # sent nothing: a probe, not worth a line at -v
            assert lines == [], server.log()[-3000:]
            return
        assert len(lines) == 1 and "not killed" in lines[0], server.log()[-3000:]
    else:
        assert rc == -9, (case, rc, res)
        assert len(lines) == 1, server.log()[-3000:]
        assert "killing the VMM" in lines[0]
    assert f"bad handshake field {field}=" in lines[0]


@pytest.mark.parametrize(("case", "args", "field"), CASES[::4], ids=[c[0] for c in CASES[::4]])
def test_bad_handshake_close_policy_leaves_peer_alive(servers: dict[str, ServerProc], case: str,
                                                      args: list[str], field: str) -> None:
    server = servers["close"]
    c = _raw(server, args)
    rc, res = finish(c, timeout=20)
    assert rc == 3 and res == {"closed": True}, (case, rc, res)
    if case != "silent":
        assert f"vm pid={c.pid}: bad handshake field {field}=" in server.log()
        assert "closing the connection" in server.log()


def test_server_still_serves_after_bad_handshakes(servers: dict[str, ServerProc],
                                                  tmp_path: Path) -> None:
    for server in servers.values():
        snap = str(Path(server.socket_path).parent / "mem.snap")
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)], "--threads", "2")))
        assert rc == 0, res
        assert server.proc.poll() is None


# The two escapes of issue 13 (finding 4): before the fix json.loads raised RecursionError
# or ValueError out of the handshake thread, so neither policy ran and the connection
# stayed open until the peer gave up.
ESCAPES = [
    ("nested-1000", "[" * 1000 + "]" * 1000, "depth"),
    ("int-4301-digits", '[{"base_host_virt_addr": ' + "9" * 4301 + ', "size": 4096, '
     '"offset": 0}]', "64-bit"),
]


@pytest.fixture(scope="module")
def patient_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProc]]:
    """Servers whose handshake timeout is far longer than any test: a peer that is dealt
    with at all was dealt with by the bad-handshake path, not by the timeout."""
    yield from _server_per_policy(tmp_path_factory, "patient", "3600")


@pytest.mark.parametrize("policy", ["kill", "close"])
@pytest.mark.parametrize(("case", "payload", "word"), ESCAPES, ids=[c[0] for c in ESCAPES])
def test_parser_escapes_take_the_bad_handshake_path(patient_servers: dict[str, ServerProc],
                                                    policy: str, case: str, payload: str,
                                                    word: str) -> None:
    server = patient_servers[policy]
    c = _raw(server, ["--payload", payload])
    rc, res = finish(c, timeout=30)  # the handshake timeout is an hour
    if policy == "kill":
        assert rc == -9, (case, rc, res)
    else:
        assert rc == 3 and res == {"closed": True}, (case, rc, res)
    log = server.log()
    lines = [ln for ln in log.splitlines() if f"vm pid={c.pid}: bad handshake" in ln]
    assert len(lines) == 1 and word in lines[0], log[-3000:]
    assert len(lines[0]) < 600  # the peer's 4301 digits are not copied into the log
    assert "Traceback" not in log
    assert server.proc.poll() is None


def test_region_past_the_file_names_the_region_and_by_how_much(
        servers: dict[str, ServerProc]) -> None:
    """A Firecracker VMM restoring a larger snapshot (no identity line): the log says
    which region and how many bytes past the file it ends (issue 17)."""
    server = servers["kill"]
    payload = ('[{"base_host_virt_addr": BASE, "size": 983040, "offset": 0}, '
               '{"base_host_virt_addr": 139637976727552, "size": 131072, "offset": 983040}]')
    c = _raw(server, ["--payload", payload])
    rc, res = finish(c, timeout=20)
    assert rc == -9, (rc, res)
    lines = [ln for ln in server.log().splitlines() if f"vm pid={c.pid}: bad handshake" in ln]
    assert len(lines) == 1, server.log()[-3000:]
    assert "bad handshake field regions[1].offset=983040" in lines[0]
    assert "(size 131072) end 65536 bytes (0.0625 MiB) past the end of the memory file " \
           f"({SIZE} bytes, 1 MiB)" in lines[0]


def _identity(size: int, sha: str | None, path: str) -> str:
    return "\n" + json.dumps({"pagein": "identity", "size": size, "sha256": sha,
                              "path": path}) + "\n"


def test_identity_of_another_snapshot_is_told_and_closed_not_killed(
        servers: dict[str, ServerProc], tmp_path: Path) -> None:
    """pagein's identity extension: a VMM restoring another snapshot gets one reply line
    naming both and the connection closes, before any page; it is not killed."""
    server = servers["kill"]
    snap = str(Path(server.socket_path).parent / "mem.snap")
    want = hashlib.sha256(Path(snap).read_bytes()).hexdigest()
    other = str(tmp_path / "other.mem")
    for size, sha, word in ((SIZE, "0" * 64, f"sha256 {want}"),
                            (2 * SIZE, "1" * 64, f"{2 * SIZE} bytes")):
        c = _raw(server, ["--payload", "[{" + GOOD + "}]" + _identity(size, sha, other)])
        rc, res = finish(c, timeout=20)
        assert rc == 3, (rc, res)  # told, not killed
        reply = json.loads(str(res["reply"]))
        assert reply["pagein"] == "identity" and reply["ok"] is False
        assert reply["error"].startswith(f"this handler serves {snap} ({SIZE} bytes")
        assert word in reply["error"] and f"the snapshot is {other} ({size} bytes" \
            in reply["error"]
        assert f"vm pid={c.pid}: refused: this handler serves" in server.log()
    assert f"hashing {snap}" in server.log()  # no state file beside it: hashed, once
    assert server.log().count(f"hashing {snap}") == 1


def test_identity_line_with_bad_regions_gets_the_reason(servers: dict[str, ServerProc]) -> None:
    """A VMM that speaks the extension is told why its regions are refused, too."""
    server = servers["kill"]
    snap = str(Path(server.socket_path).parent / "mem.snap")
    payload = ('[{"base_host_virt_addr": BASE, "size": 65536, '
               f'"offset": {SIZE}}}]') + _identity(SIZE, None, snap)
    c = _raw(server, ["--payload", payload])
    rc, res = finish(c, timeout=20)
    assert rc == 3, (rc, res)
    reply = json.loads(str(res["reply"]))
    assert reply["ok"] is False
    assert reply["error"].startswith("bad handshake field regions[0].offset=1048576")


def test_bad_identity_field_is_named(servers: dict[str, ServerProc]) -> None:
    server = servers["close"]
    line = '\n{"pagein": "identity", "size": "big", "sha256": null, "path": "/x"}\n'
    c = _raw(server, ["--payload", "[{" + GOOD + "}]" + line])
    rc, res = finish(c, timeout=20)
    assert rc == 3, (rc, res)
    assert "bad handshake field identity.size='big'" in json.loads(str(res["reply"]))["error"]
