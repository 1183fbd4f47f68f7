"""The guest's console: input lines queued by the VMM's user, output collected and echoed.

The guest reads one request line at a time (``Port.READ``) and writes bytes
(``Port.PUTC``/``Port.WRITE``). Several vCPUs may read; each line goes to exactly one.
Waits are interruptible (:meth:`Console.interrupt`) so a pause or a stop never leaves
a vCPU thread blocked on input.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class Console:
    """Line-oriented input queue and byte output with an optional echo ``sink``."""

    def __init__(self, sink: Callable[[bytes], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._lines: deque[bytes] = deque()
        self._partial = bytearray()
        self._eof = False
        self._out = bytearray()
        self._read_pos = 0
        self._sink = sink

    # --- the user's side -----------------------------------------------------------

    def send(self, text: str | bytes) -> None:
        """Queue input; complete lines (ending in newline) become requests."""
        data = text.encode() if isinstance(text, str) else text
        with self._cond:
            self._partial += data
            while (nl := self._partial.find(b"\n")) >= 0:
                self._lines.append(bytes(self._partial[: nl + 1]))
                del self._partial[: nl + 1]
            self._cond.notify_all()

    def close_input(self) -> None:
        """End of input: a pending partial line is delivered, then the guest reads EOF."""
        with self._cond:
            if self._partial:
                self._lines.append(bytes(self._partial))
                self._partial.clear()
            self._eof = True
            self._cond.notify_all()

    def read_line(self, timeout: float) -> str:
        """Return the guest's next output line (without the newline).

        Raises ``TimeoutError`` when no full line arrives within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while (nl := self._out.find(b"\n", self._read_pos)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    pending = bytes(self._out[self._read_pos:])
                    raise TimeoutError(f"no console line from the guest within {timeout} s "
                                       f"(partial output {pending!r})")
                self._cond.wait(left)
            line = bytes(self._out[self._read_pos: nl])
            self._read_pos = nl + 1
        return line.decode(errors="replace")

    def pending_input(self) -> bytes:
        """Input queued but not yet read by the guest (a snapshot keeps it)."""
        with self._cond:
            return b"".join(self._lines) + bytes(self._partial)

    def output(self) -> bytes:
        """Everything the guest wrote so far."""
        with self._cond:
            return bytes(self._out)

    # --- the guest's side (called from vCPU threads) --------------------------------

    def write(self, data: bytes) -> None:
        with self._cond:
            self._out += data
            self._cond.notify_all()
        if self._sink is not None:
            self._sink(data)

    def take_line(self, capacity: int, cancelled: Callable[[], bool]) -> bytes | None:
        """Block for the next input line (at most ``capacity`` bytes; the rest stays
        queued). ``b""`` is end of input; ``None`` means ``cancelled()`` turned true."""
        with self._cond:
            while not self._lines and not self._eof:
                if cancelled():
                    return None
                self._cond.wait()
            if cancelled():
                return None
            if not self._lines:
                return b""
            line = self._lines.popleft()
            if len(line) > capacity:
                self._lines.appendleft(line[capacity:])
                line = line[:capacity]
            return line

    def interrupt(self) -> None:
        """Wake every waiter so it re-checks its ``cancelled`` condition."""
        with self._cond:
            self._cond.notify_all()
