"""A fixed-size bitmap of pages, with the range operations the fault server needs.

Bit ``i`` is page ``i`` of a region. Bits live in a ``bytearray`` or in a writable
buffer handed in (the shared memory of :mod:`pagein.serve.state`, which the native fault
core writes too), least significant bit first within each byte: the layout the native
core reads. Searches for the next set or clear bit run in C (``re`` over the bytes), so
scanning a 1 GiB region (262,144 pages, 32 KiB of bits) costs microseconds. Nothing is
cached beside the bits, so another writer of the same memory is always seen.
"""

from __future__ import annotations

import re

__all__ = ["Bitmap"]

_NOT_FULL = re.compile(b"[^\xff]")
_NOT_EMPTY = re.compile(b"[^\x00]")


def nbytes(size: int) -> int:
    """Bytes of storage ``size`` bits need."""
    return (size + 7) // 8


class Bitmap:
    """``size`` bits, all clear at first (or whatever ``buffer`` holds). Not thread-safe:
    one owner mutates it at a time."""

    __slots__ = ("_bits", "size")

    def __init__(self, size: int, buffer: memoryview | bytearray | None = None) -> None:
        if size < 0:
            raise ValueError(f"bitmap size {size} must not be negative")
        self.size = size
        if buffer is None:
            buffer = bytearray(nbytes(size))
        elif len(buffer) < nbytes(size):
            raise ValueError(f"a buffer of {len(buffer)} bytes cannot hold {size} bits")
        self._bits: bytearray | memoryview = buffer[: nbytes(size)]

    def __len__(self) -> int:
        return self.size

    @property
    def buffer(self) -> memoryview | bytearray:
        """The bits themselves (what the native fault core reads and writes)."""
        return self._bits

    def __contains__(self, index: int) -> bool:
        return self.test(index)

    def test(self, index: int) -> bool:
        """Return whether bit ``index`` is set."""
        self._check(index, 1)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    @property
    def count(self) -> int:
        """How many bits are set (counted now: another writer may share the bits)."""
        return self.count_range(0, self.size)

    def full(self) -> bool:
        """Whether every bit is set."""
        whole = self.size >> 3
        if whole and _NOT_FULL.search(self._bits, 0, whole) is not None:
            return False
        return all(self.test(i) for i in range(whole << 3, self.size))

    def _check(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > self.size:
            raise IndexError(f"bits {start}..{start + n} are outside a bitmap of {self.size}")

    def count_range(self, start: int, n: int) -> int:
        """How many bits in ``[start, start+n)`` are set."""
        self._check(start, n)
        total = 0
        i = start
        end = start + n
        while i < end and i & 7:
            total += self.test(i)
            i += 1
        whole_end = end & ~7
        if i < whole_end:
            total += int.from_bytes(self._bits[i >> 3: whole_end >> 3],
                                    "little").bit_count()
            i = whole_end
        while i < end:
            total += self.test(i)
            i += 1
        return total

    def _assign(self, start: int, n: int, value: bool) -> int:
        """Set or clear ``[start, start+n)``; return how many bits changed."""
        self._check(start, n)
        before = self.count_range(start, n) if n else 0
        end = start + n
        i = start
        bits = self._bits
        while i < end and i & 7:
            if value:
                bits[i >> 3] |= 1 << (i & 7)
            else:
                bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            i += 1
        whole_end = end & ~7
        if i < whole_end:
            bits[i >> 3: whole_end >> 3] = (b"\xff" if value else b"\x00") * ((whole_end - i) >> 3)
            i = whole_end
        while i < end:
            if value:
                bits[i >> 3] |= 1 << (i & 7)
            else:
                bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            i += 1
        return (n - before) if value else before

    def set(self, start: int, n: int = 1) -> int:
        """Set ``[start, start+n)``; return how many bits were clear before."""
        return self._assign(start, n, True)

    def clear(self, start: int, n: int = 1) -> int:
        """Clear ``[start, start+n)``; return how many bits were set before."""
        return self._assign(start, n, False)

    def _next(self, start: int, want_set: bool) -> int:
        """First index >= start whose bit equals ``want_set``, or ``size``."""
        if start >= self.size:
            return self.size
        i = max(start, 0)
        # Finish the partial byte bit by bit, then jump over whole bytes in C.
        while i & 7 and i < self.size:
            if self.test(i) == want_set:
                return i
            i += 1
        if i >= self.size:
            return self.size
        m = (_NOT_EMPTY if want_set else _NOT_FULL).search(self._bits, i >> 3)
        if m is None:
            return self.size
        i = m.start() * 8
        while i < self.size:
            if self.test(i) == want_set:
                return i
            i += 1
        return self.size

    def next_set(self, start: int) -> int:
        """Return the first set bit at or after ``start``, or ``size`` when none."""
        return self._next(start, True)

    def next_clear(self, start: int) -> int:
        """Return the first clear bit at or after ``start``, or ``size`` when none."""
        return self._next(start, False)

    def clear_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the ``(first, count)`` runs of clear bits inside ``[start, end)``."""
        self._check(start, end - start)
        out: list[tuple[int, int]] = []
        i = start
        while i < end:
            i = self.next_clear(i)
            if i >= end:
                break
            j = min(self.next_set(i), end)
            out.append((i, j - i))
            i = j
        return out
