"""Process plumbing through ``prctl(2)``: a subreaper, a process name."""

from __future__ import annotations

import os

from pagein._abi import libc

__all__ = ["set_child_subreaper", "set_name"]


def _call(option: int, arg: int) -> None:
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = libc.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper() -> None:
    """Make this process the parent of every orphaned descendant (``PR_SET_CHILD_SUBREAPER``).

    A descendant whose parent exits is reparented here instead of to init: this process
    can then ``waitpid`` it, and a pid it reaps itself cannot be reused before it does.
    """
    _call(libc.PR_SET_CHILD_SUBREAPER, 1)


def set_name(name: str) -> None:
    """Set this thread's name as ``ps``/``top`` show it (``/proc/PID/comm``; 15 bytes)."""
    buf = libc.string_buffer(name.encode()[:15])
    _call(libc.PR_SET_NAME, libc.addressof(buf))
