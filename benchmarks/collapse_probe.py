"""Probe: does MADV_COLLAPSE turn a userfaultfd-filled range into a huge page, and at what cost?

Run: ``.venv/bin/python benchmarks/collapse_probe.py [--ranges 16] [--json FILE]``.

A child process plays the VMM: it maps anonymous memory (``MAP_PRIVATE|MAP_ANONYMOUS|
MAP_NORESERVE``, 2 MiB-aligned), creates a uffd with ``UFFD_FEATURE_EVENT_REMOVE``,
registers the memory in MISSING mode (WP too, for the write-protect case) and hands the
uffd to this process, the handler, which installs every 4 KiB page with ``UFFDIO_COPY``.
Then, for each case, it asks the kernel to collapse and reports what the kernel says,
what ``/proc/CHILD/smaps`` says (``AnonHugePages``) and whether the bytes are still the
ones copied:

- ``process_madvise``: the handler collapses the VMM's range through a pidfd;
- ``madvise in the VMM``: the VMM collapses its own range;
- ``one missing page``: 511 of 512 pages installed;
- ``one zero page``: one page installed with ``UFFDIO_ZEROPAGE`` (a hole of the file);
- ``uffd-wp armed``: registered MISSING|WP, pages copied without and with the WP bit;
- ``REMOVE after collapse``: ``MADV_DONTNEED`` of one 4 KiB page inside a collapsed huge
  page: does the next touch fault to the handler again (and read what it installs)?

Costs are per 2 MiB, median over ``--ranges`` ranges, next to the cost of installing
those 512 pages with one ``UFFDIO_COPY`` (the handler's usual bulk fill).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import socket
import statistics
import sys
import time

from pagein._abi.uffd import CopyMode, Feature, RegisterMode
from pagein.sys.fdpass import recv_with_fds, send_with_fds
from pagein.sys.mapping import Advice, Mapping
from pagein.sys.thp import HUGE_BYTES, Collapsed, anon_huge_bytes, collapse
from pagein.sys.uffd import PageFault, Remove, Userfaultfd

PAGE = 4096


def _vmm(sock: socket.socket, size: int, wp: bool) -> None:
    """The child: memory + uffd, then obey one-line commands until EOF."""
    m = Mapping.anonymous(size + HUGE_BYTES)  # trimmed to a 2 MiB boundary below
    base = -(-m.address // HUGE_BYTES) * HUGE_BYTES
    uffd = Userfaultfd.open(Feature.EVENT_REMOVE)
    mode = RegisterMode.MISSING | RegisterMode.WP if wp else RegisterMode.MISSING
    uffd.register(base, size, mode)
    send_with_fds(sock, json.dumps({"base": base}).encode(), [uffd.fileno()])
    f = sock.makefile("rwb", buffering=0)
    for line in f:
        op, a, n = line.split()
        off, length = int(a), int(n)
        if op == b"collapse":
            t0 = time.perf_counter_ns()
            r = collapse(None, base + off, length)
            dt = time.perf_counter_ns() - t0
            out = {"ok": isinstance(r, Collapsed), "errno": getattr(r, "errno", 0), "ns": dt}
        elif op == b"dontneed":
            libc_m = Mapping(base + off, length, owned=False)
            libc_m.madvise(Advice.DONTNEED)
            out = {"ok": True}
        else:  # hash: touch the bytes (faults go to the handler)
            view = Mapping(base + off, length, owned=False).read(0, length)
            out = {"sha": hashlib.sha256(view).hexdigest()}
        f.write(json.dumps(out).encode() + b"\n")


class Vmm:
    """The handler's view of one child VMM."""

    def __init__(self, size: int, *, wp: bool = False) -> None:
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            parent.close()
            try:
                _vmm(child, size, wp)
            finally:
                os._exit(0)
        child.close()
        self.pid, self.sock, self.size = pid, parent, size
        self.pidfd = os.pidfd_open(pid)
        got = recv_with_fds(parent, 4096, 1)
        self.base = int(json.loads(got.data)["base"])
        self.uffd = Userfaultfd.adopt(got.fds[0], features=Feature.EVENT_REMOVE)
        self._f = parent.makefile("rwb", buffering=0)

    def ask(self, op: str, off: int, length: int) -> dict[str, object]:
        self._f.write(f"{op} {off} {length}\n".encode())
        line = self._f.readline()
        return dict(json.loads(line))

    def huge(self) -> int:
        return anon_huge_bytes(self.pid, self.base, self.base + self.size)

    def close(self) -> None:
        self._f.close()
        self.sock.close()
        self.uffd.close()
        os.close(self.pidfd)
        os.waitpid(self.pid, 0)


def _fill(vmm: Vmm, src: Mapping, off: int, length: int, mode: CopyMode = CopyMode.NONE) -> int:
    t0 = time.perf_counter_ns()
    vmm.uffd.copy(vmm.base + off, src.address + off, length, mode)
    return time.perf_counter_ns() - t0


def _sha(src: Mapping, off: int, length: int) -> str:
    return hashlib.sha256(src.read(off, length)).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranges", type=int, default=16, help="2 MiB ranges per timed case")
    ap.add_argument("--json", help="write the facts here too")
    args = ap.parse_args()
    n = max(2, args.ranges)
    size = n * HUGE_BYTES
    src = Mapping.anonymous(size)
    src.write(0, os.urandom(size))
    facts: dict[str, object] = {"kernel": os.uname().release}

    # Warm up (the first collapses of a process run take 2-5x longer): not timed.
    vmm = Vmm(2 * HUGE_BYTES)
    _fill(vmm, src, 0, 2 * HUGE_BYTES)
    collapse(vmm.pidfd, vmm.base, 2 * HUGE_BYTES)
    vmm.close()
    # 1. process_madvise from the handler, and madvise in the VMM, on wholly copied ranges.
    for who in ("process_madvise", "madvise in the VMM"):
        vmm = Vmm(size)
        fill_ns, col_ns, ok = [], [], 0
        for i in range(n):
            off = i * HUGE_BYTES
            fill_ns.append(_fill(vmm, src, off, HUGE_BYTES))
            if who == "process_madvise":
                t0 = time.perf_counter_ns()
                r = collapse(vmm.pidfd, vmm.base + off, HUGE_BYTES)
                col_ns.append(time.perf_counter_ns() - t0)
                ok += isinstance(r, Collapsed)
            else:
                a = vmm.ask("collapse", off, HUGE_BYTES)
                col_ns.append(int(str(a["ns"])))
                ok += bool(a["ok"])
        exact = vmm.ask("hash", 0, size)["sha"] == _sha(src, 0, size)
        facts[who] = {"collapsed": f"{ok}/{n}", "anon_huge_mib": vmm.huge() >> 20,
                      "bytes_exact": exact,
                      "collapse_us_per_2mib": statistics.median(col_ns) / 1e3,
                      "copy_us_per_2mib": statistics.median(fill_ns) / 1e3}
        vmm.close()

    # 2. One missing page; one zero page.
    vmm = Vmm(2 * HUGE_BYTES)
    _fill(vmm, src, 0, HUGE_BYTES - PAGE)
    r = collapse(vmm.pidfd, vmm.base, HUGE_BYTES)
    facts["one missing page"] = {"result": _name(r), "anon_huge_mib": vmm.huge() >> 20}
    _fill(vmm, src, HUGE_BYTES, HUGE_BYTES - PAGE)
    vmm.uffd.zeropage(vmm.base + 2 * HUGE_BYTES - PAGE, PAGE)
    r = collapse(vmm.pidfd, vmm.base + HUGE_BYTES, HUGE_BYTES)
    facts["one zero page"] = {"result": _name(r), "anon_huge_mib": vmm.huge() >> 20}
    vmm.close()

    # 3. uffd-wp armed: pages copied without, then with, the write-protect bit.
    vmm = Vmm(2 * HUGE_BYTES, wp=True)
    _fill(vmm, src, 0, HUGE_BYTES)
    _fill(vmm, src, HUGE_BYTES, HUGE_BYTES, CopyMode.WP)
    facts["uffd-wp armed, pages not protected"] = {
        "result": _name(collapse(vmm.pidfd, vmm.base, HUGE_BYTES))}
    facts["uffd-wp armed, pages protected"] = {
        "result": _name(collapse(vmm.pidfd, vmm.base + HUGE_BYTES, HUGE_BYTES))}
    facts["uffd-wp armed, anon_huge_mib"] = vmm.huge() >> 20
    vmm.close()

    # 4. REMOVE inside a collapsed huge page: split, zapped, and a fault to the handler.
    vmm = Vmm(HUGE_BYTES)
    _fill(vmm, src, 0, HUGE_BYTES)
    r = collapse(vmm.pidfd, vmm.base, HUGE_BYTES)
    before = vmm.huge()
    facts["REMOVE after collapse"] = _remove_case(vmm, src, r, before)
    vmm.close()

    width = max(len(k) for k in facts)
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(facts, f, indent=2)
    return 0


def _remove_case(vmm: Vmm, src: Mapping, r: object, before: int) -> dict[str, object]:
    victim = 5 * PAGE
    vmm._f.write(f"dontneed {victim} {PAGE}\n".encode())
    events = _events(vmm, 5.0)
    removed = any(isinstance(e, Remove) for e in events)
    vmm._f.readline()
    after_remove = vmm.huge()
    # The touch must fault to us; answer it with zeros (as the server does after REMOVE).
    vmm._f.write(f"hash {victim} {PAGE}\n".encode())
    faults = [e for e in _events(vmm, 5.0) if isinstance(e, PageFault)]
    for e in faults:
        vmm.uffd.zeropage(e.address & ~(PAGE - 1), PAGE)
    sha = json.loads(vmm._f.readline())["sha"]
    rest = vmm.ask("hash", 0, victim)["sha"] == _sha(src, 0, victim)
    return {"collapse": _name(r), "anon_huge_mib_before": before >> 20,
            "remove_event": removed, "anon_huge_mib_after_remove": after_remove >> 20,
            "touch_faulted_to_handler": bool(faults),
            "reads_zeros": sha == hashlib.sha256(bytes(PAGE)).hexdigest(),
            "other_pages_exact": rest}


def _events(vmm: Vmm, timeout: float) -> list[object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = select.poll()
        p.register(vmm.uffd.fileno(), select.POLLIN)
        if p.poll(max(0.0, deadline - time.monotonic()) * 1e3):
            got = vmm.uffd.read_events()
            if got:
                return list(got)
    return []


def _name(r: object) -> str:
    if isinstance(r, Collapsed):
        return "collapsed"
    e = getattr(r, "errno", 0)
    return f"refused: {os.strerror(e)} (errno {e}): {getattr(r, 'reason', '')}"


if __name__ == "__main__":
    sys.exit(main())
