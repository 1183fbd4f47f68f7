"""A Firecracker-faithful fault-handler client, run as its own process by the serve tests.

It does what Firecracker's VMM does on a UFFD restore: map each guest region
``MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE`` (plus ``MAP_HUGETLB|MAP_HUGE_2MB``), create a
uffd requiring ``UFFD_FEATURE_EVENT_REMOVE`` (not user-mode-only), register every region
in MISSING mode, connect, send ONE message with the JSON regions and the uffd, and keep
the socket and its own uffd open. Then it plays the guest: several threads copy every
page out with ``ctypes.memmove`` (which releases the GIL, so threads fault concurrently)
and compare it with the memory file, byte for byte.

Modes:
  touch  restore and check every page (optionally ballooning while faulting)
  raw    send an arbitrary payload (bad handshakes) and wait for the socket to close

Output: progress lines ``touched N`` with --progress, then one JSON line
``{"ok": bool, "pages": N, "errors": [...]}``; exit status 0 when every byte matched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import socket
import sys
import threading
from dataclasses import dataclass

from pagein._abi import libc
from pagein._abi.mman import Advice
from pagein.serve.firecracker import Generation, Region, connect_and_send
from pagein.serve.pagecache import request_page_cache
from pagein.sys.fdpass import send_with_fds
from pagein.sys.mapping import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping
from pagein.sys.pagemap import Pagemap
from pagein.sys.uffd import Feature, RegisterMode, Userfaultfd


@dataclass
class Guest:
    regions: list[Region]
    mappings: list[Mapping]
    uffd: Userfaultfd
    sock: socket.socket
    file: bytes


def parse_layout(text: str) -> list[tuple[int, int]]:
    """``"OFF:SIZE,OFF:SIZE"`` (bytes) -> [(offset, size), ...]."""
    out = []
    for part in text.split(","):
        off, size = part.split(":")
        out.append((int(off, 0), int(size, 0)))
    return out


def start_guest(args: argparse.Namespace) -> Guest:
    page = HUGE_PAGE_SIZE if args.hugetlb else PAGE_SIZE
    with open(args.mem_file, "rb") as f:
        data = f.read()
    features = Feature.EVENT_REMOVE
    if args.remap:  # not what Firecracker asks for: only to exercise REMAP/UNMAP handling
        features |= Feature.EVENT_REMAP | Feature.EVENT_UNMAP
    layout = parse_layout(args.regions)
    cache = None
    mode = RegisterMode.MISSING
    if args.share_pages:  # pagein's extension: guest memory is a private map of its cache
        cache = request_page_cache(args.socket, page,
                                   need_bytes=max(off + size for off, size in layout))
        features |= (Feature.MINOR_HUGETLBFS | Feature.MISSING_HUGETLBFS if args.hugetlb
                     else Feature.MINOR_SHMEM | Feature.MISSING_SHMEM)
        mode = RegisterMode.MISSING if args.share_bad == "missing-only" else \
            RegisterMode.MISSING | RegisterMode.MINOR
    uffd = Userfaultfd.open(features, nonblocking=True)
    regions, mappings = [], []
    for off, size in layout:
        if cache is None:
            m = Mapping.anonymous(size, hugetlb=args.hugetlb, noreserve=True)
        else:
            at = off + (page if args.share_bad == "offset" else 0)
            # MAP_NORESERVE as Firecracker maps guest memory: a private hugetlbfs mapping
            # would otherwise reserve a huge page for every page it might copy.
            m = cache.memfd.map(shared=args.share_bad == "shared", offset=at, length=size,
                                noreserve=True)
        uffd.register(m.address, size, mode)
        mappings.append(m)
        regions.append(Region(m.address, size, off, page))
    sock = connect_and_send(args.socket, regions, uffd, generation=Generation(args.generation))
    return Guest(regions, mappings, uffd, sock, data)


_MARK_AT = 16  # where --write puts its 8-byte marker in a page


class Checker:
    """Copy pages out of guest memory with memmove (GIL released) and compare them."""

    def __init__(self, guest: Guest, progress: bool) -> None:
        self.guest = guest
        self.errors: list[str] = []
        self.pages = 0
        self.progress = progress
        self.pause_after = 0
        self.lock = threading.Lock()
        self.zero_ranges: list[tuple[int, int]] = []  # guest addresses that must read zeros
        self.write = False  # after checking a page, the guest writes a marker into it
        self.written: dict[int, bytes] = {}  # page address -> marker at _MARK_AT

    def expected(self, region: Region, page: int) -> bytes:
        ps = region.page_size
        addr = region.base_address + page * ps
        for a, b in self.zero_ranges:
            if a <= addr < b:
                return bytes(ps)
        off = region.offset + page * ps
        want = self.guest.file[off: off + ps]
        mark = self.written.get(addr)
        if mark is not None:
            want = want[:_MARK_AT] + mark + want[_MARK_AT + len(mark):]
        return want

    def check_page(self, region: Region, page: int, buf: ctypes.Array[ctypes.c_char]) -> None:
        ps = region.page_size
        ctypes.memmove(buf, region.base_address + page * ps, ps)
        got = buf.raw[:ps]
        want = self.expected(region, page)
        with self.lock:
            self.pages += 1
            if got != want:
                kind = "zeros" if not any(got) else "other bytes"
                self.errors.append(f"region at file 0x{region.offset:x} page {page}: read "
                                   f"{kind} instead of the snapshot")
                sys.stdout.write(f"mismatch {self.errors[-1]}\n")
                sys.stdout.flush()
            if self.progress:
                sys.stdout.write(f"touched {self.pages}\n")
                sys.stdout.flush()
            if self.pause_after == self.pages:
                # Let the test act (kill the server, kill us) at a known point.
                sys.stdout.write("paused\n")
                sys.stdout.flush()
                sys.stdin.readline()

    def visit(self, thread: int, threads: int, region: Region, page: int,
              buf: ctypes.Array[ctypes.c_char]) -> None:
        """One access of a toucher thread. With ``write``, every 4th page is written
        first (a write fault: the fill, then the guest's store) by one owning thread,
        which then checks it; the other pages are read by every thread (they collide)."""
        if not self.write or page % 4 != 3:
            self.check_page(region, page, buf)
            return
        if (page // 4) % threads != thread:
            return  # another thread writes this one: a read could race with its store
        addr = region.base_address + page * region.page_size
        if not self.zeroed(addr):
            mark = b"PGIN" + ((addr // region.page_size) & 0xFFFFFFFF).to_bytes(4, "little")
            ctypes.memmove(addr + _MARK_AT, mark, len(mark))
            with self.lock:
                self.written[addr] = mark
        self.check_page(region, page, buf)

    def zeroed(self, addr: int) -> bool:
        return any(a <= addr < b for a, b in self.zero_ranges)

    def recheck_written(self) -> None:
        """Read every page the guest wrote again: its write is there, the rest is the
        snapshot (a fill must never land on a page the guest already has)."""
        by_addr = {r.base_address + p * r.page_size: (r, p) for r in self.guest.regions
                   for p in range(r.size_bytes // r.page_size)}
        write, self.write = self.write, False
        buf = ctypes.create_string_buffer(max(r.page_size for r in self.guest.regions))
        for addr in sorted(self.written):
            if addr in by_addr:
                self.check_page(*by_addr[addr], buf)
        self.write = write

    def run_threads(self, threads: int, seed: int) -> None:
        work = [(r, p) for r in self.guest.regions for p in range(r.size_bytes // r.page_size)]

        def worker(i: int) -> None:
            buf = ctypes.create_string_buffer(max(r.page_size for r in self.guest.regions))
            order = list(work)
            random.Random(seed + i).shuffle(order)  # threads collide on pages: EEXIST races
            for r, p in order:
                self.visit(i, threads, r, p, buf)

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def balloon_while_faulting(checker: Checker, rounds: int) -> None:
    """Inflate/deflate a balloon over the second half of region 0 while other threads fault.

    The balloon thread drops its range with MADV_DONTNEED (a REMOVE event) and checks it
    reads zeros, then writes a marker and reads it back (deflate: the guest reuses it).
    """
    g = checker.guest
    r0, m0 = g.regions[0], g.mappings[0]
    half = (r0.size_bytes // r0.page_size // 2) * r0.page_size
    checker.zero_ranges.append((r0.base_address + half, r0.end_address))
    others = [r for r in g.regions[1:]] + [Region(r0.base_address, half, r0.offset,
                                                   r0.page_size)]

    def balloon() -> None:
        ps = r0.page_size
        buf = ctypes.create_string_buffer(ps)
        for k in range(rounds):
            m0.madvise(Advice.DONTNEED, half, r0.size_bytes - half)
            for p in range(half // ps, r0.size_bytes // ps):
                ctypes.memmove(buf, r0.base_address + p * ps, ps)
                if any(buf.raw):
                    with checker.lock:
                        checker.errors.append(f"balloon round {k}: page {p} not zero after "
                                              "MADV_DONTNEED")
                marker = bytes([k + 1]) * 8
                ctypes.memmove(r0.base_address + p * ps, marker, 8)
                ctypes.memmove(buf, r0.base_address + p * ps, 8)
                if buf.raw[:8] != marker:
                    with checker.lock:
                        checker.errors.append(f"balloon round {k}: page {p} lost a write")
        m0.madvise(Advice.DONTNEED, half, r0.size_bytes - half)

    def faulter(i: int) -> None:
        buf = ctypes.create_string_buffer(max(r.page_size for r in others))
        order = [(r, p) for r in others for p in range(r.size_bytes // r.page_size)]
        random.Random(i).shuffle(order)
        for r, p in order:
            checker.visit(i, 2, r, p, buf)

    ts = [threading.Thread(target=balloon)] + [threading.Thread(target=faulter, args=(i,))
                                               for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # After the last DONTNEED the ballooned half must read zeros again, page by page.
    buf = ctypes.create_string_buffer(r0.page_size)
    for p in range(half // r0.page_size, r0.size_bytes // r0.page_size):
        checker.check_page(r0, p, buf)


def remap_then_unmap(checker: Checker) -> None:
    """Touch half of region 0, mremap it elsewhere, touch the rest there, munmap a quarter
    of it, then touch every other region: the server must follow the moves."""
    g = checker.guest
    r0, m0 = g.regions[0], g.mappings[0]
    n = r0.size_bytes // r0.page_size
    buf = ctypes.create_string_buffer(r0.page_size)
    for p in range(0, n, 2):
        checker.check_page(r0, p, buf)
    target = Mapping.anonymous(r0.size_bytes).release()  # reserve an address, then move
    m0.move_to(target)
    moved = Region(m0.address, r0.size_bytes, r0.offset, r0.page_size)
    for p in range(n):
        checker.check_page(moved, p, buf)
    quarter = (n // 4) * r0.page_size
    if libc.munmap(m0.address + r0.size_bytes - quarter, quarter) != 0:
        raise OSError(ctypes.get_errno(), "munmap")
    g.regions = g.regions[1:]
    checker.run_threads(2, 5)


def memory_of(mappings: list[Mapping]) -> tuple[int, int]:
    """The guest regions' anonymous and resident bytes (/proc/self/smaps): with
    --share-pages the clean pages are the cache's, resident but not anonymous. (Hugetlb
    pages are in neither: smaps calls a cache page "private" once no one else maps it,
    so the hugetlb tests compare the PFNs behind the pages instead.)"""
    starts = {m.address for m in mappings}
    anon = rss = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) in starts
            elif inside and head in ("Anonymous:", "Rss:"):
                kib = int(line.split()[1]) * 1024
                if head == "Rss:":
                    rss += kib
                else:
                    anon += kib
    return anon, rss


def cmd_touch(args: argparse.Namespace) -> int:
    guest = start_guest(args)
    if args.blocking_after_handshake:  # the shared open file: the server's copy blocks too
        sys.stdin.readline()  # once the server has taken the handshake
        guest.uffd.set_nonblocking(False)
    checker = Checker(guest, args.progress)

    def thread_failed(e: threading.ExceptHookArgs) -> None:  # a dead toucher is a failure
        with checker.lock:
            checker.errors.append(f"thread {e.thread.name if e.thread else '?'} failed: "
                                  f"{e.exc_type.__name__}: {e.exc_value}")

    threading.excepthook = thread_failed
    checker.pause_after = args.pause_after
    checker.write = args.write
    if args.remap:
        remap_then_unmap(checker)
    elif args.balloon_rounds:
        balloon_while_faulting(checker, args.balloon_rounds)
    else:
        if args.pre_balloon:
            # Balloon an untouched range first: it must read zeros, never the snapshot.
            off, length = (int(x, 0) for x in args.pre_balloon.split(":"))
            guest.mappings[0].madvise(Advice.DONTNEED, off, length)
            base = guest.regions[0].base_address
            checker.zero_ranges.append((base + off, base + off + length))
        checker.run_threads(args.threads, args.seed)
    checker.recheck_written()
    anon, rss = memory_of(guest.mappings)
    with Pagemap() as pm:  # one PFN per guest page (root reads them): who backs each page
        pfns = [pm.pages(r.base_address + p * r.page_size, 4096)[0].pfn
                for r in guest.regions for p in range(r.size_bytes // r.page_size)]
    print(json.dumps({"ok": not checker.errors, "pages": checker.pages,
                      "written": len(checker.written), "anon_bytes": anon, "rss_bytes": rss,
                      "pfns": pfns if args.hugetlb else [],
                      "errors": checker.errors[:20]}), flush=True)
    if args.hold:
        sys.stdin.read()  # keep the VM "running" until the test closes our stdin
    return 0 if not checker.errors else 1


def cmd_raw(args: argparse.Namespace) -> int:
    """Send ``--payload`` (with a uffd unless --no-fd) and report how the server reacted."""
    uffd = Userfaultfd.open(Feature.NONE if args.no_remove else Feature.EVENT_REMOVE,
                            nonblocking=not args.blocking)
    m = Mapping.anonymous(1 << 20)
    uffd.register(m.address, m.length, RegisterMode.MISSING)
    payload = args.payload.replace("BASE", str(m.address)).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    if args.silent:
        pass  # connect and say nothing: the handshake timeout must fire
    elif args.no_fd:
        sock.sendall(payload)
    elif args.pipe_fd:
        r, _w = os.pipe()
        send_with_fds(sock, payload, [r])
    else:
        extra = [os.pipe()[0] for _ in range(args.extra_fds)]
        send_with_fds(sock, payload, [uffd.fileno(), *extra])
    sys.stdout.write("sent\n")
    sys.stdout.flush()
    got = b""
    while data := sock.recv(4096):  # until the server closes (or kills us)
        got += data
    doc: dict[str, object] = {"closed": True}
    if got:  # what the server answered first (pagein's identity reply)
        doc["reply"] = got.decode(errors="replace")
    print(json.dumps(doc), flush=True)
    return 3


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("touch")
    t.add_argument("--socket", required=True)
    t.add_argument("--mem-file", required=True)
    t.add_argument("--regions", required=True, help="OFF:SIZE,... in the memory file")
    t.add_argument("--generation", default="current", choices=[g.value for g in Generation])
    t.add_argument("--hugetlb", action="store_true")
    t.add_argument("--threads", type=int, default=4)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--progress", action="store_true")
    t.add_argument("--pre-balloon", help="OFF:LEN in region 0 to drop before touching")
    t.add_argument("--balloon-rounds", type=int, default=0)
    t.add_argument("--hold", action="store_true")
    t.add_argument("--write", action="store_true",
                   help="write a marker into every 4th page (a write fault) and check it; "
                   "recheck every written page at the end")
    t.add_argument("--blocking-after-handshake", action="store_true",
                   help="after a line on stdin, clear O_NONBLOCK on the uffd (sent already)")
    t.add_argument("--remap", action="store_true",
                   help="also negotiate EVENT_REMAP/UNMAP; mremap and munmap region 0")
    t.add_argument("--share-pages", action="store_true",
                   help="pagein's extension: map guest memory MAP_PRIVATE from the server's "
                   "page cache of the snapshot and register it MISSING|MINOR")
    t.add_argument("--share-bad", choices=["offset", "shared", "missing-only"],
                   help="with --share-pages, map or register the cache wrongly")
    t.add_argument("--pause-after", type=int, default=0,
                   help="after N pages print 'paused' and wait for a line on stdin")
    t.set_defaults(fn=cmd_touch)
    r = sub.add_parser("raw")
    r.add_argument("--socket", required=True)
    r.add_argument("--payload", default="")
    r.add_argument("--no-fd", action="store_true")
    r.add_argument("--silent", action="store_true")
    r.add_argument("--pipe-fd", action="store_true", help="send a pipe instead of a uffd")
    r.add_argument("--no-remove", action="store_true",
                   help="a uffd without UFFD_FEATURE_EVENT_REMOVE")
    r.add_argument("--blocking", action="store_true", help="a uffd without O_NONBLOCK")
    r.add_argument("--extra-fds", type=int, default=0,
                   help="send this many pipe fds after the uffd in the same message")
    r.set_defaults(fn=cmd_raw)
    args = p.parse_args()
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
