"""pagein's identity line: parsing it off the handshake's rest (bounded, in pieces) and
judging it against the served file (hashed at most once per version of the file)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pagein.errors import HandlerError, HandshakeError
from pagein.serve.identity import (
    MAX_LINE,
    FileDigests,
    Identity,
    Verdict,
    await_reply,
    reply,
    split_identity,
)

SHA = "ab" * 32


def _later(sock: socket.socket, *pieces: bytes) -> threading.Thread:
    def send() -> None:
        for p in pieces:
            time.sleep(0.01)
            sock.sendall(p)
    t = threading.Thread(target=send)
    t.start()
    return t


def test_split_takes_the_line_and_leaves_the_rest() -> None:
    a, b = socket.socketpair()
    with a, b:
        line = Identity(8192, SHA, "/snap/memory").encode()
        got, rest = split_identity(a, b"\n" + line + b'{"pagein": "stats"}\n', time.monotonic() + 5)
        assert got == Identity(8192, SHA, "/snap/memory")
        assert rest == b'{"pagein": "stats"}\n'


def test_split_reads_a_line_that_arrives_in_pieces() -> None:
    a, b = socket.socketpair()
    with a, b:
        line = Identity(4096, None, "/m").encode()
        t = _later(b, line[5:20], line[20:])
        got, rest = split_identity(a, line[:5], time.monotonic() + 5)
        t.join()
        assert got == Identity(4096, None, "/m") and rest == b""


@pytest.mark.parametrize("rest", [b"", b"   ", b'{"pagein": "stats"}\n', b"garbage\n"])
def test_split_leaves_anything_else_alone(rest: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        got, left = split_identity(a, rest, time.monotonic() + 5)
        assert got is None and left.strip() == rest.strip()


def test_split_is_bounded() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * (MAX_LINE + 10))  # no newline, ever
        with pytest.raises(HandshakeError, match=r"identity.*longer than 8192"):
            split_identity(a, b'{"pagein": "identity", "path": "', time.monotonic() + 5)
        with pytest.raises(HandshakeError, match="did not end"):
            split_identity(a, b'{"pagein"', time.monotonic() + 0.05)


@pytest.mark.parametrize(("doc", "field"), [
    ({"size": 0, "sha256": None, "path": "/m"}, "identity.size"),
    ({"size": True, "sha256": None, "path": "/m"}, "identity.size"),
    ({"size": 1 << 70, "sha256": None, "path": "/m"}, "identity.size"),
    ({"size": 4096, "sha256": "AB" * 32, "path": "/m"}, "identity.sha256"),
    ({"size": 4096, "sha256": "ab", "path": "/m"}, "identity.sha256"),
    ({"size": 4096, "sha256": None, "path": 7}, "identity.path"),
    ({"size": 4096, "sha256": None, "path": "/m", "layer": "xyz"}, "identity.layer"),
])
def test_decode_names_the_bad_field(doc: dict[str, object], field: str) -> None:
    line = json.dumps({"pagein": "identity", **doc}).encode()
    with pytest.raises(HandshakeError, match=f"bad handshake field {field}="):
        Identity.decode(line)


def test_a_chain_is_told_by_its_top_layer_digest() -> None:
    """A VMM restoring a diff layer names its layer file; a server serving a chain
    compares it with its own top layer's (no memory file to hash on either side)."""
    theirs = Identity.decode(Identity(8192, None, "/snap/d2/memory", SHA).encode())
    assert theirs.layer_sha256 == SHA
    served = FileDigests(None, 8192, describe="/snap/d2 (chain of 2 diff layers)",
                         layer_sha256=SHA)
    assert served.check(theirs) == Verdict(("size", "layer"))
    other = FileDigests(None, 8192, describe="/snap/d3 (chain of 3 diff layers)",
                        layer_sha256="cd" * 32)
    bad = other.check(theirs)
    assert bad.checked == ("size", "layer")
    assert bad.error == (f"this handler serves /snap/d3 (chain of 3 diff layers) (8192 "
                         f"bytes, layer sha256 {'cd' * 32}), the snapshot is "
                         f"/snap/d2/memory (8192 bytes, sha256 not recorded, layer sha256 "
                         f"{SHA})")
    # A full snapshot's VMM (no layer) against a chain: the size, as before.
    assert other.check(Identity(8192, None, "/snap/full/memory")) == Verdict(("size",))


def test_describe_bounds_a_peer_path() -> None:
    text = Identity(4096, None, "/" + "x" * 5000 + "\n").describe()
    assert len(text) < 400 and "\n" not in text


def test_digests_hash_once_per_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mem = tmp_path / "mem"
    mem.write_bytes(os.urandom(3 * 4096))
    want = hashlib.sha256(mem.read_bytes()).hexdigest()
    digests = FileDigests(str(mem), 3 * 4096)
    with caplog.at_level(logging.INFO, "pagein.serve"):
        assert digests.check(Identity(3 * 4096, want, "/elsewhere")) == \
            Verdict(("size", "sha256"))
        assert digests.check(Identity(3 * 4096, want, "/elsewhere")).error is None
        assert sum("hashing" in r.message for r in caplog.records) == 1
        mem.write_bytes(os.urandom(3 * 4096))  # a new version: hashed again, now differs
        os.utime(mem, ns=(1, 1))
        bad = digests.check(Identity(3 * 4096, want, "/elsewhere"))
        assert bad.error is not None and bad.error.startswith(f"this handler serves {mem}")
        assert sum("hashing" in r.message for r in caplog.records) == 2


def test_digests_same_file_and_given_digest_hash_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mem = tmp_path / "mem"
    mem.write_bytes(b"\x01" * 8192)
    with caplog.at_level(logging.INFO, "pagein.serve"):
        assert FileDigests(str(mem), 8192).check(Identity(8192, SHA, str(mem))) == \
            Verdict(("size", "file"))
        given = FileDigests(str(mem), 8192, known_sha256="cd" * 32)
        assert given.check(Identity(8192, "cd" * 32, "/x")).error is None
        assert given.check(Identity(8192, SHA, "/x")).error is not None
        wrong_size = given.check(Identity(4096, SHA, "/x"))
        assert wrong_size.checked == ("size",) and "(4096 bytes" in str(wrong_size.error)
    assert not any("hashing" in r.message for r in caplog.records)


def test_await_reply_turns_the_answer_into_one_error() -> None:
    for answer, words in ((reply(Verdict((), "this handler serves A, the snapshot is B")),
                           "refused this VM: this handler serves A, the snapshot is B"),
                          (b"", "closed the connection without answering"),
                          (b"hello\n", "not an identity reply")):
        a, b = socket.socketpair()
        with a, b:
            b.sendall(answer)
            if not answer:
                b.shutdown(socket.SHUT_WR)
            with pytest.raises(HandlerError, match=words):
                await_reply(a, "/run/pf.sock", 5)
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(HandlerError, match=r"did not answer .* within 0\.05 s"):
            await_reply(a, "/run/pf.sock", 0.05)
        b.sendall(reply(Verdict(("size", "sha256"))))
        assert await_reply(a, "/run/pf.sock", 5).checked == ("size", "sha256")


def test_deep_nesting_is_a_bad_field_not_a_crash() -> None:
    line = b'{"pagein": "identity", "size": ' + b"[" * 8000 + b"]" * 8000 + b"}"
    with pytest.raises(HandshakeError, match="bad handshake field identity"):
        Identity.decode(line)
