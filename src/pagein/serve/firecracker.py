"""Firecracker's page-fault handler protocol, both sides.

The handler listens on a Unix stream socket. The VMM creates guest memory, creates a
userfaultfd (requiring ``UFFD_FEATURE_EVENT_REMOVE``), registers every region in MISSING
mode, connects, and sends ONE ``sendmsg``: a JSON array with one object per region and
the uffd as SCM_RIGHTS. No length prefix, no reply; the VMM keeps the socket open::

    [{"base_host_virt_addr": 140240000000000, "size": 134217728, "offset": 0,
      "page_size": 4096, "page_size_kib": 4096}, ...]

Three generations of that object are in the field (all sizes in bytes):

- ``current``: ``page_size`` and the legacy ``page_size_kib`` (which also holds bytes);
- ``legacy-kib``: only ``page_size_kib``;
- ``original``: neither page field (Firecracker < 1.7), meaning 4096.

Wire names stay in this module: the rest of pagein sees :class:`Region` values.

The peer is not trusted: whatever bytes it sends, the decoder either returns regions or
raises :class:`~pagein.errors.HandshakeError` naming what was wrong. The limits that
make that true, each checked before the step it protects:

- size: at most :data:`MAX_HANDSHAKE_BYTES`, counted as the bytes arrive;
- nesting: at most :data:`MAX_DEPTH` (an array of flat objects), counted by the
  :class:`ArrayScanner` as the bytes arrive, so ``json.loads`` never recurses deeper
  (a 1000-deep array would raise ``RecursionError`` inside it);
- numbers: at most :data:`MAX_NUMBER_DIGITS` characters (an unsigned 64-bit integer has
  20 digits; Python refuses to convert more than 4300 and is quadratic below that);
- regions: at most :data:`MAX_REGIONS`.
"""

from __future__ import annotations

import enum
import errno
import itertools
import json
import os
import re
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pagein.errors import HandlerError, HandshakeError, UntrustedHandler
from pagein.serve.identity import Identity, await_reply
from pagein.sys.fdpass import peer_credentials, recv_with_fds, send_with_fds
from pagein.sys.poll import wait_readable
from pagein.sys.uffd import Feature, Userfaultfd

__all__ = [
    "MAX_DEPTH",
    "MAX_HANDSHAKE_BYTES",
    "MAX_NUMBER_DIGITS",
    "MAX_REGIONS",
    "PAGE_SIZES",
    "ArrayScanner",
    "Generation",
    "Handshake",
    "Region",
    "check_trusted",
    "connect_and_send",
    "encode_regions",
    "json_end",
    "parse_regions",
    "receive_handshake",
    "uncovered_bytes",
    "validate_regions",
]

#: The page sizes a region may use: base pages and 2 MiB huge pages.
PAGE_SIZES = (4096, 2 * 1024 * 1024)
#: A handshake larger than this is refused (thousands of regions fit in it).
MAX_HANDSHAKE_BYTES = 4 * 1024 * 1024
#: The nesting a handshake may have: the array (1) of flat region objects (2).
MAX_DEPTH = 2
#: Characters a number may have: 20 digits hold any unsigned 64-bit integer; a few more
#: let a float or an exponent reach the check that names the field.
MAX_NUMBER_DIGITS = 32
#: Regions a handshake may describe (a Firecracker VM has a handful).
MAX_REGIONS = 4096
_RECV_CHUNK = 256 * 1024
#: Room for fds per recvmsg: the kernel's SCM_MAX_FD, the most one message can carry, so
#: the count in a "more than one fd" error is the real one.
MAX_FDS_PER_MESSAGE = 253


@dataclass(frozen=True, slots=True)
class Region:
    """One guest memory region: where it is mapped in the VMM and where its bytes are."""

    base_address: int
    size_bytes: int
    offset: int  # in the raw memory file
    page_size: int = 4096

    @property
    def end_address(self) -> int:
        return self.base_address + self.size_bytes

    @property
    def end_offset(self) -> int:
        return self.offset + self.size_bytes

    @property
    def pages(self) -> int:
        """How many pages of :attr:`page_size` the region holds."""
        return self.size_bytes // self.page_size

    def page_offset(self, page: int) -> int:
        """The offset of page ``page`` in the raw memory file."""
        return self.offset + page * self.page_size

    def page_of_offset(self, offset: int) -> int:
        """The page holding file offset ``offset`` (which must lie in the region)."""
        return (offset - self.offset) // self.page_size

    def pages_in(self, offset: int, length: int) -> tuple[int, int]:
        """``(first, count)`` of the pages the file range ``[offset, offset+length)``
        touches inside this region (count 0 when it misses the region)."""
        lo, hi = max(offset, self.offset), min(offset + length, self.end_offset)
        if lo >= hi:
            return 0, 0
        first = (lo - self.offset) // self.page_size
        last = (hi - self.offset + self.page_size - 1) // self.page_size
        return first, last - first


class Generation(enum.Enum):
    """Which page-size fields a VMM's handshake carries."""

    CURRENT = "current"  # page_size + page_size_kib (Firecracker >= 1.10)
    LEGACY_KIB = "legacy-kib"  # page_size_kib only (holds bytes despite its name)
    ORIGINAL = "original"  # neither: 4096


# --- encoding (the VMM side) ---------------------------------------------------------


def encode_regions(regions: Sequence[Region], generation: Generation = Generation.CURRENT) -> bytes:
    """Encode regions as the JSON array a Firecracker VMM of ``generation`` sends."""
    out = []
    for r in regions:
        obj: dict[str, int] = {"base_host_virt_addr": r.base_address, "size": r.size_bytes,
                               "offset": r.offset}
        if generation is not Generation.ORIGINAL:
            obj["page_size_kib"] = r.page_size
        if generation is Generation.CURRENT:
            obj["page_size"] = r.page_size
        out.append(obj)
    return json.dumps(out).encode()


def connect_and_send(socket_path: str, regions: Sequence[Region], uffd: Userfaultfd | int, *,
                     generation: Generation = Generation.CURRENT,
                     timeout: float | None = 10.0,
                     mem_file: str = "MEMORY_FILE",
                     trust_uids: Sequence[int] = (),
                     identity: Identity | None = None) -> socket.socket:
    """Do what Firecracker's VMM does: connect, send the regions and the uffd in one message.

    Whoever receives the uffd can read and write the guest's memory, so before sending
    it the listener's uid (``SO_PEERCRED``: who called ``listen``) must be root, this
    process's own uid, or one of ``trust_uids``; otherwise
    :class:`~pagein.errors.UntrustedHandler` is raised naming the uid, and nothing is
    sent. (Firecracker itself sends to whoever listens: keep its socket directory
    private.)

    Returns the connected socket: keep it open for as long as the guest runs (closing it
    tells the handler the VM is gone). The caller keeps its own copy of the uffd, as
    Firecracker does, so the guest freezes rather than reads zeros if the handler dies.
    Raises :class:`~pagein.errors.HandlerError` when nothing listens on ``socket_path``,
    with the ``pagein serve`` command to start (``mem_file`` names its memory file).

    ``identity``: pagein's extension (:mod:`pagein.serve.identity`): the snapshot's
    size and SHA-256 follow the regions in the same message, and this waits (up to
    ``timeout``) for the handler's answer, raising :class:`HandlerError` with its reason
    when it serves another snapshot, before any page of it reaches the guest.
    """
    fd = uffd if isinstance(uffd, int) else uffd.fileno()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            _connect(sock, socket_path, timeout)
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
            why = e.strerror or "timed out"
            raise HandlerError(
                f"no UFFD handler listens on {socket_path} ({why}): start one with "
                f"`pagein serve --socket {socket_path} --mem-file {mem_file}` first") from e
        check_trusted(sock, socket_path, trust_uids)
        payload = encode_regions(regions, generation)
        if identity is not None:  # in the same message: the server reads it as the rest
            payload += b"\n" + identity.encode()
        sent = send_with_fds(sock, payload, [fd])
        if sent < len(payload):  # the fd went with the first part; the rest follows
            sock.sendall(payload[sent:])
        sock.settimeout(None)
        if identity is not None:
            await_reply(sock, socket_path, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def check_trusted(sock: socket.socket, socket_path: str, trust_uids: Sequence[int]) -> None:
    """Raise :class:`UntrustedHandler` unless the listener runs as a uid we trust."""
    listener = peer_credentials(sock)
    if listener.uid not in {0, os.geteuid(), *trust_uids}:
        raise UntrustedHandler(socket_path, listener.uid, listener.pid)


def _connect(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect, waiting while the handler's listen backlog is full.

    With a timeout set, a Unix socket's connect() does not wait for room in a full
    backlog: it fails at once with EAGAIN (and cannot be polled for completion), which
    a server taking a thousand VMMs at once can cause. Retry until ``timeout``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "the handler's listen backlog stayed "
                                   "full") from None
            time.sleep(0.005)


# --- decoding (the handler side) -----------------------------------------------------


_TOKEN = re.compile(rb'[\[\]{}"\\]')
_NON_SPACE = re.compile(rb"[^ \t\r\n]")


class ArrayScanner:
    """Find where a JSON array ends in a byte stream fed piece by piece.

    The handshake has no length prefix, so the handler must know when the peer's one
    message is complete without waiting for a close. Only brackets, quotes and
    backslashes matter; a C-level regex skips everything else, and each byte is
    looked at once however many pieces the array arrives in (the buffer grows in
    place: a peer sending one byte at a time costs linear time, not quadratic).

    Nesting deeper than ``max_depth`` raises :class:`HandshakeError` as soon as the
    byte that opens it arrives (``None``: no limit).
    """

    def __init__(self, max_depth: int | None = MAX_DEPTH) -> None:
        self._buf = bytearray()
        self._max_depth = max_depth
        self._pos = 0  # next byte to scan
        self._depth = 0
        self._started = False
        self._in_str = False
        self._skip_to = 0  # a backslash in a string hides the next byte

    def feed(self, data: bytes) -> int | None:
        """Add bytes; return the index just past the array's ``]`` once it has arrived.

        Raises :class:`HandshakeError` when the stream does not start with an array or
        nests deeper than allowed.
        """
        self._buf += data
        buf = self._buf
        if not self._started:
            first = _NON_SPACE.search(buf, self._pos)
            if first is None:
                self._pos = len(buf)
                return None
            start = first.start()
            if buf[start] != 0x5B:  # [
                raise HandshakeError("payload", bytes(buf[start:start + 40]).decode(
                    errors="replace"), "expected a JSON array of regions")
            self._started = True
            self._pos = start + 1
            self._depth = 1
        for m in _TOKEN.finditer(buf, self._pos):
            i = m.start()
            if i < self._skip_to:
                continue
            ch = buf[i]
            if self._in_str:
                if ch == 0x5C:  # backslash
                    self._skip_to = i + 2
                elif ch == 0x22:
                    self._in_str = False
            elif ch == 0x22:
                self._in_str = True
            elif ch in b"[{":
                self._depth += 1
                if self._max_depth is not None and self._depth > self._max_depth:
                    raise HandshakeError("payload", f"nesting depth {self._depth} at byte {i}",
                                         f"a handshake is an array of flat objects (depth "
                                         f"at most {self._max_depth})")
            elif ch in b"]}":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        self._pos = len(buf)
        return None


def json_end(buf: bytes, max_depth: int | None = MAX_DEPTH) -> int | None:
    """Return the index just past the top-level JSON array in ``buf``, or None.

    Raises :class:`HandshakeError` when ``buf`` cannot start an array or nests deeper
    than ``max_depth``.
    """
    return ArrayScanner(max_depth).feed(buf)


class _LongNumber:
    """A number with more characters than :data:`MAX_NUMBER_DIGITS`, never converted."""

    def __init__(self, text: str) -> None:
        self.length = len(text)
        self.head = text[:24]

    def __repr__(self) -> str:
        return f"<number of {self.length} characters: {self.head}...>"


def _number(convert: Callable[[str], object]) -> Callable[[str], object]:
    """A ``json`` number hook: ``convert`` short numbers, keep long ones unconverted."""
    def hook(text: str) -> object:
        return convert(text) if len(text) <= MAX_NUMBER_DIGITS else _LongNumber(text)
    return hook


_INT, _FLOAT = _number(int), _number(float)


def _opt_int(obj: dict[str, object], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, _LongNumber):
        raise HandshakeError(f"{where}.{key}", value,
                             "must be an unsigned 64-bit integer (at most 20 digits)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandshakeError(f"{where}.{key}", value, "must be an integer")
    if value < 0 or value >= 1 << 64:
        raise HandshakeError(f"{where}.{key}", value, "must be an unsigned 64-bit integer")
    return value


def _req_int(obj: dict[str, object], key: str, where: str) -> int:
    value = _opt_int(obj, key, where)
    if value is None:
        raise HandshakeError(f"{where}.{key}", None, "missing")
    return value


def _region(obj: object, where: str) -> Region:
    if not isinstance(obj, dict):
        raise HandshakeError(where, obj, "each region must be a JSON object")
    base = _req_int(obj, "base_host_virt_addr", where)
    size = _req_int(obj, "size", where)
    offset = _req_int(obj, "offset", where)
    page_size = _opt_int(obj, "page_size", where)
    legacy = _opt_int(obj, "page_size_kib", where)
    if page_size is not None and legacy is not None and page_size != legacy:
        raise HandshakeError(f"{where}.page_size_kib", legacy,
                             f"disagrees with page_size={page_size} (both hold bytes)")
    ps = page_size if page_size is not None else legacy if legacy is not None else 4096
    return Region(base, size, offset, ps)


def parse_regions(payload: bytes) -> list[Region]:
    """Decode a handshake payload of any generation into regions (no range checks).

    Whatever ``payload`` holds, the result is a list of regions or a
    :class:`HandshakeError` naming what was wrong: size, nesting and number length are
    bounded before ``json.loads`` sees the bytes (see the module docstring).
    """
    if len(payload) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError("payload", f"{len(payload)} bytes",
                             f"larger than {MAX_HANDSHAKE_BYTES} bytes")
    end = json_end(payload)  # refuses a non-array and deep nesting before json.loads
    if end is None:
        raise HandshakeError("payload", f"{len(payload)} bytes",
                             "the JSON array is not complete (a closing bracket is missing)")
    try:
        # Decoded as UTF-8 here, not by json.loads (which would guess UTF-16 or -32 from
        # NUL bytes): in UTF-8 no byte of a multi-byte character looks like a bracket or
        # a quote, so the depth the scanner counted is the depth json.loads meets.
        doc = json.loads(bytes(payload).decode("utf-8"), parse_int=_INT, parse_float=_FLOAT)
    except (ValueError, RecursionError) as e:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError cannot
        # happen after the depth check, kept so that no input can escape as a traceback.
        raise HandshakeError("payload", bytes(payload[:60]).decode(errors="replace"),
                             f"not valid JSON ({str(e)[:200]})") from e
    if not isinstance(doc, list):
        raise HandshakeError("payload", type(doc).__name__, "expected a JSON array of regions")
    if not doc:
        raise HandshakeError("payload", "[]", "the VMM sent no regions")
    if len(doc) > MAX_REGIONS:
        raise HandshakeError("payload", f"{len(doc)} regions",
                             f"at most {MAX_REGIONS} regions are accepted")
    return [_region(obj, f"regions[{i}]") for i, obj in enumerate(doc)]


def validate_regions(regions: Sequence[Region], file_size: int) -> None:
    """Check regions before serving a page: sizes, alignment, file bounds, no overlaps.

    Raises :class:`HandshakeError` naming the first bad field and its value.
    """
    for i, r in enumerate(regions):
        where = f"regions[{i}]"
        if r.page_size not in PAGE_SIZES:
            raise HandshakeError(f"{where}.page_size", r.page_size,
                                 "must be 4096 or 2097152 (2 MiB hugetlbfs)")
        if r.size_bytes == 0:
            raise HandshakeError(f"{where}.size", 0, "a region must not be empty")
        for key, value in (("base_host_virt_addr", r.base_address), ("size", r.size_bytes),
                           ("offset", r.offset)):
            if value % r.page_size:
                raise HandshakeError(f"{where}.{key}", value,
                                     f"must be a multiple of the page size {r.page_size}")
        if r.end_offset > file_size:
            over = r.end_offset - file_size
            raise HandshakeError(f"{where}.offset", r.offset,
                                 f"region bytes 0x{r.offset:x}-0x{r.end_offset:x} (size "
                                 f"{r.size_bytes}) end {over} bytes ({_mib(over)}) past the "
                                 f"end of the memory file ({file_size} bytes, "
                                 f"{_mib(file_size)}): the VMM restores a larger snapshot "
                                 "than the one this handler serves")
        if r.end_address > 1 << 64:
            raise HandshakeError(f"{where}.size", r.size_bytes,
                                 "the region wraps the address space")
    _check_overlaps(regions, "base_host_virt_addr", lambda r: (r.base_address, r.end_address))
    _check_overlaps(regions, "offset", lambda r: (r.offset, r.end_offset))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


def uncovered_bytes(regions: Sequence[Region], file_size: int) -> int:
    """Bytes of the memory file no region covers (0 for a Firecracker snapshot, whose
    regions lie back to back over the whole file: more hints at the wrong snapshot)."""
    return file_size - sum(r.size_bytes for r in regions)


def _check_overlaps(regions: Sequence[Region], key: str,
                    span: Callable[[Region], tuple[int, int]]) -> None:
    spans = sorted((span(r), i) for i, r in enumerate(regions))
    for (a, ia), (b, ib) in itertools.pairwise(spans):
        if b[0] < a[1]:
            # Blame the region listed later: the earlier one was fine on its own.
            (bad, bad_span), (other, other_span) = sorted([(ia, a), (ib, b)], reverse=True)
            raise HandshakeError(f"regions[{bad}].{key}", bad_span[0],
                                 f"overlaps regions[{other}] "
                                 f"(0x{other_span[0]:x}-0x{other_span[1]:x})")


def _out_of_fds() -> bool:
    """Whether this process cannot open one more fd now (EMFILE/ENFILE)."""
    try:
        os.close(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        return e.errno in (errno.EMFILE, errno.ENFILE)
    return False


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a VMM sent: its regions, the uffd (now owned by the receiver) and any bytes after."""

    regions: tuple[Region, ...]
    uffd_fd: int
    rest: bytes
    features: Feature = Feature.NONE  # what the VMM negotiated on the uffd


def _uffd_features(fd: int) -> Feature | None:
    """Read the features negotiated on a uffd from ``/proc/self/fdinfo`` (None if absent).

    The kernel prints ``API:<api>:<features>:<ioctls>`` in hex for a userfaultfd.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    known = sum(int(x) for x in Feature)
                    return Feature(int(line.split(":")[2], 16) & known)
    except (OSError, ValueError, IndexError):
        return None
    return None


def uffd_pollerr_reason(fd: int) -> str:
    """Why a userfaultfd polls as an error: it is blocking, or UFFDIO_API was never done."""
    try:
        blocking = os.get_blocking(fd)  # the flag of the VMM's open file, shared
    except OSError:
        blocking = False
    if blocking:
        return ("the userfaultfd is blocking: the VMM must create it with O_NONBLOCK "
                "(UFFD_NONBLOCK), as Firecracker does; a blocking uffd cannot be polled")
    return "the VMM never called UFFDIO_API on this userfaultfd"


def _is_uffd(fd: int) -> bool:
    """Whether ``fd`` is a userfaultfd (by its ``/proc/self/fd`` link)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _UFFD_LINK
    except OSError:
        return False


_UFFD_LINK = "anon_inode:[userfaultfd]"


def _check_uffd(fd: int) -> Feature:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return Feature.NONE  # no /proc: trust the peer; a bad fd fails its first ioctl
    if target != _UFFD_LINK:
        raise HandshakeError("uffd", target, "the file descriptor sent is not a userfaultfd")
    # A uffd polls as an error until UFFDIO_API has been called on it, and always when it
    # is blocking (the kernel will not promise a read that does not block).
    p = select.poll()
    p.register(fd, select.POLLIN)
    if any(ev & select.POLLERR for _, ev in p.poll(0)):
        raise HandshakeError("uffd", fd, uffd_pollerr_reason(fd))
    features = _uffd_features(fd)
    if features is not None and Feature.EVENT_REMOVE not in features:
        # Without REMOVE events a balloon's MADV_DONTNEED is invisible to the handler, and
        # the guest would later read stale snapshot bytes where it expects zeros.
        raise HandshakeError("uffd", f"features=0x{int(features):x}",
                             "the VMM must enable UFFD_FEATURE_EVENT_REMOVE (as Firecracker "
                             "does), or ballooned pages would read stale snapshot data")
    return features or Feature.NONE


def receive_handshake(sock: socket.socket, file_size: int | None,
                      timeout: float) -> Handshake:
    """Receive and validate one handshake within ``timeout`` seconds.

    Reads until the JSON array is complete (it may span many reads: there is no length
    prefix and it can be far larger than 1 KiB). Raises :class:`HandshakeError` naming
    the bad field; on error every received fd is closed. ``file_size`` None leaves
    :func:`validate_regions` to the caller (who first checks pagein's identity line in
    :attr:`Handshake.rest`, so that a VMM restoring another snapshot is told which).
    """
    deadline = time.monotonic() + timeout
    buf = bytearray()
    scanner = ArrayScanner()
    fds: list[int] = []  # the first fd received; later ones are counted and closed
    nfds, cut = 0, False
    try:
        end = None
        while end is None:
            remaining = deadline - time.monotonic()
            # poll, not select: select() cannot wait on an fd >= 1024, and a server with
            # a thousand VMs connected has such fds.
            if remaining <= 0 or not wait_readable([sock], remaining):
                raise HandshakeError("handshake", f"{len(buf)} bytes",
                                     f"no complete handshake within {timeout:g} s")
            got = recv_with_fds(sock, _RECV_CHUNK, MAX_FDS_PER_MESSAGE)
            if got.truncated and _out_of_fds():
                # The kernel dropped the uffd for want of a free fd here: the server's
                # problem, not the VMM's (so not a HandshakeError, which would kill it).
                for fd in [*fds, *got.fds]:
                    os.close(fd)
                fds.clear()
                raise OSError(errno.EMFILE, "the uffd the VMM sent was dropped: this "
                              "process has no free file descriptor (raise the open-file "
                              "limit, ulimit -n)")
            # Keep one fd (the uffd), count the rest and close them at once: a peer
            # sending fds with every byte cannot make this process hold thousands.
            for fd in got.fds:
                nfds += 1
                if fds:
                    os.close(fd)
                else:
                    fds.append(fd)
            cut = cut or got.truncated  # MSG_CTRUNC: the kernel dropped some fds
            if nfds > 1 or (cut and nfds):  # refused at once, with the real count
                count = f"more than {nfds} fds" if cut else f"{nfds} fds"
                raise HandshakeError("uffd", count,
                                     "expected exactly one userfaultfd in SCM_RIGHTS")
            if not got.data:
                raise HandshakeError("handshake", f"{len(buf)} bytes",
                                     "the peer closed the socket before the handshake ended")
            buf += got.data
            if len(buf) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError("payload", f"{len(buf)} bytes",
                                     f"larger than {MAX_HANDSHAKE_BYTES} bytes")
            end = scanner.feed(got.data)
        regions = parse_regions(bytes(buf[:end]))
        if nfds != 1 or cut:
            count = f"more than {nfds} fds" if cut else f"{nfds} fds"
            raise HandshakeError("uffd", count, "expected exactly one userfaultfd in SCM_RIGHTS")
        features = _check_uffd(fds[0])
        if file_size is not None:
            validate_regions(regions, file_size)
    except HandshakeError as e:
        e.sent_uffd = any(_is_uffd(fd) for fd in fds)
        e.received_bytes = len(buf)
        for fd in fds:
            os.close(fd)
        raise
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Handshake(tuple(regions), fds[0], bytes(buf[end:]), features)

