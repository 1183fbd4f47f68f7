"""Python references of the guest workloads: the answers the guest must give.

Vectorised with numpy (uint64 arithmetic wraps like C's), so a 128 MiB state checks in
about a second. Each function mirrors the C file named in its docstring.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pagein.vmm.workloads import RECORD_BYTES, Pattern, function_table_capacity

U64 = np.uint64
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
PAGE_WORDS = 512
Array = npt.NDArray[np.uint64]


def mix(z: Array) -> Array:
    """splitmix64's finalizer on an array (``pg_mix`` in pagein_guest.h)."""
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def mix1(z: int) -> int:
    return int(mix(np.array([z & M64], dtype=U64))[0])


def _sum(a: Array) -> int:
    return int(a.sum(dtype=U64))


class FunctionReference:
    """``guest/function.c``: records, hash table and the answers to each request."""

    def __init__(self, state_bytes: int, seed: int = 1, vcpus: int = 1) -> None:
        self.vcpus = vcpus
        self.records = state_bytes // RECORD_BYTES
        self.capacity = function_table_capacity(self.records)
        idx = np.arange(self.records, dtype=U64)
        self.keys = mix(idx + U64(seed & M64))
        self._sorted = np.argsort(self.keys)
        # payload[j] of record i is mix(basis[i] + j + 1): the key until an update.
        self.basis = self.keys.copy()

    def payload(self, j: int) -> Array:
        return mix(self.basis + U64(j + 1))

    def update(self, a: int, b: int, seed: int) -> int:
        """``update A B S``: rewrite the payload of records [A, B); return how many."""
        b = min(b, self.records)
        a = min(a, b)
        self.basis[a:b] = mix(np.arange(a, b, dtype=U64) + U64(seed & M64))
        return b - a

    def key(self, i: int) -> int:
        return int(self.keys[i])

    def lookup(self, key: int) -> int | None:
        pos = int(np.searchsorted(self.keys, U64(key & M64), sorter=self._sorted))
        if pos < self.records and int(self.keys[self._sorted[pos]]) == key:
            return int(self._sorted[pos])
        return None

    def get(self, key: int) -> str:
        i = self.lookup(key)
        if i is None:
            return "missing"
        k = self.basis[i : i + 1]
        return f"{i} {sum(int(mix(k + U64(j + 1))[0]) for j in range(7)) & M64}"

    def sum(self, a: int, b: int) -> int:
        b = min(b, self.records)
        a = min(a, b)
        return _sum(self.payload(0)[a:b])

    def checksum(self) -> int:
        words = np.empty((self.records, 8), dtype=U64)
        words[:, 0] = self.keys
        for j in range(7):
            words[:, j + 1] = self.payload(j)
        flat = words.reshape(-1)
        flat += np.arange(flat.size, dtype=U64)
        total = _sum(mix(flat))
        total += _sum(mix(np.arange(1, self.records + 1, dtype=U64)))
        return total & M64

    def answer(self, request: str) -> str:
        """The exact console line the guest prints for ``request``."""
        words = request.split()
        match words:
            case ["key", i] if int(i, 0) < self.records:
                return str(self.key(int(i, 0)))
            case ["key", _]:
                return "error: index out of range"
            case ["get", k]:
                return self.get(int(k, 0))
            case ["sum", a, b]:
                return str(self.sum(int(a, 0), int(b, 0)))
            case ["update", a, b, s]:
                return f"updated {self.update(int(a, 0), int(b, 0), int(s, 0))}"
            case ["checksum"]:
                return f"0x{self.checksum():016x}"
            case ["info"]:
                return f"records {self.records} table {self.capacity} vcpus {self.vcpus}"
        return "error: unknown request (key I, get K, sum A B, update A B S, checksum, info, quit)"


def scan_pages(pattern: Pattern, touches: int, pages: int, stride: int, hot: int,
               seed: int) -> Array:
    """The page of every touch (``page_of`` in ``guest/scan.c``)."""
    t = np.arange(touches, dtype=U64)
    rseed = U64((seed * GOLDEN) & M64)
    p = U64(pages)
    if pattern == Pattern.RANDOM:
        return mix(t + rseed) % p
    if pattern == Pattern.STRIDED:
        x = t * U64(stride)
        return (x + x // p) % p
    if pattern == Pattern.HOTSET:
        return (mix(t + rseed) % U64(hot)) * U64(pages // hot)
    return t % p


def scan_reference(args: tuple[int, ...], heap_bytes: int) -> tuple[int, int, int]:
    """Return ``(pages, touches, checksum)`` that ``guest/scan.c`` prints for ``args``."""
    pattern, op, size, touches, stride, hot_pct, seed = args
    size = size or heap_bytes
    pages, words = size // 4096, size // 8
    stride = stride or 1
    hot = max(pages * hot_pct // 100, 1)
    touches = touches or (pages // stride if pattern == Pattern.STRIDED else pages)
    p = scan_pages(Pattern(pattern), touches, pages, stride, hot, seed)
    w = p * U64(PAGE_WORDS) + p % U64(PAGE_WORDS)
    t = np.arange(touches, dtype=U64)
    old = mix(w + U64(seed & M64))
    if op == 1 and touches:
        # A word written by an earlier touch is read back by the later one: in the
        # order of touches per word, each touch sees the previous touch's new value.
        new = mix(t + U64((seed + words) & M64))
        order = np.argsort(w, kind="stable")
        ws = w[order]
        same = np.zeros(touches, dtype=bool)
        same[1:] = ws[1:] == ws[:-1]
        old_sorted = old[order]
        prev_new = np.empty_like(old_sorted)
        prev_new[1:] = new[order][:-1]
        old_sorted[same] = prev_new[same]
        old = np.empty_like(old_sorted)
        old[order] = old_sorted
    return pages, touches, _sum(mix(old + t))


def scan_line(args: tuple[int, ...], heap_bytes: int) -> str:
    """The exact line ``guest/scan.c`` prints."""
    pages, touches, checksum = scan_reference(args, heap_bytes)
    return f"scan pages {pages} touches {touches} checksum 0x{checksum:016x}"
