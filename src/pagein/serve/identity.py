"""pagein's identity check on Firecracker's handshake: is this the snapshot being restored?

Firecracker's handshake says where regions are, never which snapshot they belong to: a
handler serving snapshot A answers a VMM restoring snapshot B of the same size with A's
bytes, and nobody notices. A VMM that knows this extension (pagein's own) sends one more
line in the same message, right after the JSON array of regions::

    [{"base_host_virt_addr": ..., ...}]
    {"pagein": "identity", "size": 33554432, "sha256": "9f86d0...", "path": "/snap/memory"}

``size`` is the memory file's size in bytes, ``sha256`` its digest in lowercase hex (or
``null`` when the snapshot recorded none), ``path`` where the VMM found it (used only to
recognise the very file the server serves, and in messages). A VMM restoring a diff
layer adds ``"layer": HEX``, the SHA-256 of the layer's ``layer`` file, which binds the
whole chain under it (:mod:`pagein.snapshot.chain`): a server serving a chain compares
it with its own top layer's, so a restore of another chain of the same size (or
another layer of the same chain) is refused instead of served. The line ends with ``\\n``
and is at most :data:`MAX_LINE` bytes. Before any page is served the server answers with
one line on the same socket::

    {"pagein": "identity", "ok": true, "checked": ["size", "sha256"]}
    {"pagein": "identity", "ok": false, "error": "this handler serves ..., the snapshot is ..."}

and after ``"ok": false`` closes the connection (the VMM is told, so it is not killed).
``checked`` says what was compared: the size always; the SHA-256 when both sides know
it. The server knows its file's digest cheaply when it was given one (the snapshot's
state file records it) or when the VMM's ``path`` is the served file itself (same
device, inode, size and modification time); otherwise it hashes the file once, on the
first VMM that asks, with progress in the log, and keeps the digest for as long as the
file is unchanged (same device, inode, size and mtime). Firecracker sends no such line,
and its handshake is checked as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from pagein.errors import HandlerError, HandshakeError, shown
from pagein.sys.poll import wait_readable

__all__ = ["MAX_LINE", "FileDigests", "Identity", "Verdict", "await_reply", "reply",
           "split_identity"]

log = logging.getLogger("pagein.serve")

#: The longest identity line accepted (a path of 4096 bytes fits).
MAX_LINE = 8192
_PREFIX = b'{"pagein"'
_SHA = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 8 << 20
_PROGRESS_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Identity:
    """Which memory file a VMM restores: its size, SHA-256 (if recorded) and path."""

    size_bytes: int
    sha256: str | None
    path: str
    layer_sha256: str | None = None   # a diff layer: SHA-256 of its layer file

    def encode(self) -> bytes:
        """The line a VMM sends after the JSON regions (newline included)."""
        doc: dict[str, object] = {"pagein": "identity", "size": self.size_bytes,
                                  "sha256": self.sha256, "path": self.path}
        if self.layer_sha256 is not None:
            doc["layer"] = self.layer_sha256
        return json.dumps(doc).encode() + b"\n"

    def describe(self) -> str:
        """``PATH (SIZE bytes, sha256 HEX)``; a peer's path is cut to 256 characters."""
        sha = self.sha256 or "not recorded"
        path = self.path if len(self.path) <= 256 else self.path[:253] + "..."
        layer = f", layer sha256 {self.layer_sha256}" if self.layer_sha256 else ""
        return f"{path!r}"[1:-1] + f" ({self.size_bytes} bytes, sha256 {sha}{layer})"

    @classmethod
    def decode(cls, line: bytes) -> Identity:
        """Parse an identity line; raise :class:`HandshakeError` naming the bad field."""
        try:
            doc = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # 8 KiB of "[" nest past the stack
            raise HandshakeError("identity", line[:60].decode(errors="replace"),
                                 "not a JSON object on one line") from e
        if not isinstance(doc, dict) or doc.get("pagein") != "identity":
            raise HandshakeError("identity", shown(doc), 'expected {"pagein": "identity", ...}')
        size, sha, path = doc.get("size"), doc.get("sha256"), doc.get("path")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < 1 << 64:
            raise HandshakeError("identity.size", size, "must be a positive integer (bytes)")
        if sha is not None and not (isinstance(sha, str) and _SHA.fullmatch(sha)):
            raise HandshakeError("identity.sha256", sha, "must be 64 lowercase hex digits or null")
        if not isinstance(path, str) or "\0" in path:
            raise HandshakeError("identity.path", path, "must be a text path")
        layer = doc.get("layer")
        if layer is not None and not (isinstance(layer, str) and _SHA.fullmatch(layer)):
            raise HandshakeError("identity.layer", layer, "must be 64 lowercase hex digits")
        return cls(size, sha, path, layer)


def split_identity(sock: socket.socket, rest: bytes, deadline: float) -> tuple[Identity | None,
                                                                               bytes]:
    """Take the identity line off the bytes that followed the regions, if there is one.

    ``rest`` is what arrived after the JSON array; a line that starts like pagein's
    extension but is not complete yet is read to its end from ``sock`` (until
    ``deadline``, at most :data:`MAX_LINE` bytes). Returns the identity (None when the
    VMM sent none, as Firecracker does) and the bytes after it.
    """
    buf = bytearray(rest.lstrip(b" \t\r\n"))
    if not buf or not buf.startswith(_PREFIX[: len(buf)]):
        return None, rest
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise HandshakeError("identity", f"{len(buf)} bytes", f"longer than {MAX_LINE} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait_readable([sock], remaining):
            raise HandshakeError("identity", f"{len(buf)} bytes",
                                 "the identity line did not end (no newline) in time")
        got = sock.recv(MAX_LINE)
        if not got:
            raise HandshakeError("identity", f"{len(buf)} bytes",
                                 "the peer closed the socket inside the identity line")
        buf += got
    line, _, after = bytes(buf).partition(b"\n")
    if len(line) > MAX_LINE:
        raise HandshakeError("identity", f"{len(line)} bytes", f"longer than {MAX_LINE} bytes")
    if not line.startswith(_PREFIX) or b'"identity"' not in line:
        return None, bytes(buf)  # e.g. a stats request sent at once: the session answers it
    return Identity.decode(line), after


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to an identity: ``error`` None when it matches; what was compared."""

    checked: tuple[str, ...]
    error: str | None = None


def reply(verdict: Verdict) -> bytes:
    """The line the server sends back (newline included)."""
    doc: dict[str, object] = {"pagein": "identity", "ok": verdict.error is None}
    if verdict.error is None:
        doc["checked"] = list(verdict.checked)
    else:
        doc["error"] = verdict.error
    return json.dumps(doc).encode() + b"\n"


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileDigests:
    """The served memory file's identity, its SHA-256 computed at most once per version.

    ``known_sha256``: a digest given by the caller (from the snapshot's state file), so
    nothing is ever hashed. ``path`` None: the source is not a local file (a store):
    only its size can be compared. ``layer_sha256``: the served chain's top layer file
    digest, compared with a VMM's ``layer`` when both are known.
    """

    def __init__(self, path: str | None, size_bytes: int, known_sha256: str | None = None,
                 describe: str = "", layer_sha256: str | None = None) -> None:
        self.layer_sha256 = layer_sha256
        self.path = path
        self.size_bytes = size_bytes
        self.describe = describe or (path or "the source")
        self._known = known_sha256
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int, int], str] = {}

    def check(self, theirs: Identity) -> Verdict:
        """Compare a VMM's identity with the served file (may hash it once, logged)."""
        if theirs.size_bytes != self.size_bytes:
            return self._refuse(theirs, None, ("size",))
        if theirs.layer_sha256 is not None and self.layer_sha256 is not None:
            if theirs.layer_sha256 != self.layer_sha256:
                return self._refuse(theirs, None, ("size", "layer"))
            return Verdict(("size", "layer"))
        if theirs.sha256 is None:
            return Verdict(("size",))
        if self._same_file(theirs.path):
            return Verdict(("size", "file"))
        ours = self.sha256()
        if ours is None:
            return Verdict(("size",))
        if ours != theirs.sha256:
            return self._refuse(theirs, ours, ("size", "sha256"))
        return Verdict(("size", "sha256"))

    def _refuse(self, theirs: Identity, ours: str | None, checked: tuple[str, ...]) -> Verdict:
        sha = f", sha256 {ours}" if ours else ""
        if "layer" in checked:
            sha = f", layer sha256 {self.layer_sha256}"
        return Verdict(checked, f"this handler serves {self.describe} ({self.size_bytes} "
                                f"bytes{sha}), the snapshot is {theirs.describe()}")

    def _same_file(self, their_path: str) -> bool:
        """Whether the VMM's file is the served file itself (then their digest is ours)."""
        if self.path is None:
            return False
        try:
            return _key(os.stat(their_path)) == _key(os.stat(self.path))
        except OSError:
            return False

    def sha256(self) -> str | None:
        """The served file's SHA-256: given, cached for this version, or hashed now."""
        if self._known is not None or self.path is None:
            return self._known
        with self._lock:  # VMMs arriving together wait for one hash, not one each
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                log.error("cannot hash %s for the identity check: %s", self.path, e.strerror)
                return None
            try:
                key = _key(os.fstat(fd))
                if key in self._cache:
                    return self._cache[key]
                digest = self._hash(fd, key[2])
            finally:
                os.close(fd)
            self._cache = {key: digest}  # an older version of the file is never asked again
            return digest

    def _hash(self, fd: int, size: int) -> str:
        log.info("hashing %s (%d bytes) once for pagein's identity check (kept until the "
                 "file changes)", self.path, size)
        sha, done, shown_at = hashlib.sha256(), 0, 0
        while chunk := os.pread(fd, _HASH_CHUNK, done):
            sha.update(chunk)
            done += len(chunk)
            if done - shown_at >= _PROGRESS_BYTES:
                shown_at = done
                log.info("hashing %s: %d of %d MiB", self.path, done >> 20, size >> 20)
        return sha.hexdigest()


def await_reply(sock: socket.socket, socket_path: str, timeout: float | None) -> Verdict:
    """Read the server's answer to an identity line (the VMM side).

    Raises :class:`~pagein.errors.HandlerError` with the server's own sentence when it
    refused, or saying what happened when no answer came (closed: see its log; timed
    out: the handler is not a pagein serve that knows the extension).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = None if deadline is None else deadline - time.monotonic()
        if len(buf) > MAX_LINE or (remaining is not None and remaining <= 0) or \
                not wait_readable([sock], remaining):
            raise HandlerError(
                f"the UFFD handler on {socket_path} did not answer pagein's identity check "
                f"within {timeout:g} s: it is not a pagein serve that knows it (pass "
                "--no-identity-check to restore through a handler that does not)")
        try:
            got = sock.recv(MAX_LINE)
        except OSError:
            got = b""
        if not got:
            raise HandlerError(f"the UFFD handler on {socket_path} closed the connection "
                               "without answering pagein's identity check: it refused the "
                               "handshake; its log says why")
        buf += got
    try:
        doc = json.loads(buf.partition(b"\n")[0])
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("pagein") != "identity":
        raise HandlerError(f"the UFFD handler on {socket_path} answered pagein's identity "
                           f"check with {shown(buf)}, not an identity reply")
    if doc.get("ok") is not True:
        raise HandlerError(f"the UFFD handler on {socket_path} refused this VM: "
                           f"{str(doc.get('error'))[:1000]}")
    checked = doc.get("checked")
    return Verdict(tuple(str(c) for c in checked) if isinstance(checked, list) else ())
