"""Proportional set size of chosen mappings, from ``/proc/PID/smaps``.

``Pss`` divides each resident page among every process that maps it, so summing it over
all the mappings of some memory counts a page shared by N clones once, and a private
page once per clone: the host memory a fleet of clones really costs.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["pss_bytes"]

_MAX_SMAPS = 64 * 1024 * 1024  # bytes of one smaps file read at most


def pss_bytes(pid: int | str, want: Callable[[int, str], bool]) -> int:
    """Sum of ``Pss`` over the mappings of process ``pid`` (or ``"self"``) for which
    ``want(start address, path)`` is true. Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        text = f.read(_MAX_SMAPS).decode(errors="replace")
    total, take = 0, False
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            try:
                take = want(int(head.split("-")[0], 16), path)
            except ValueError:
                take = False
        elif take and head == "Pss:":
            total += int(line.split()[1]) * 1024
    return total
