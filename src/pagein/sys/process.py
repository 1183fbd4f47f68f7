"""Process plumbing through ``prctl(2)``: a subreaper, a process name."""

from __future__ import annotations

import ctypes
import os

__all__ = ["set_child_subreaper", "set_name"]

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _call(option: int, arg: int) -> None:
    if _prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper() -> None:
    """Make this process the parent of every orphaned descendant (``PR_SET_CHILD_SUBREAPER``).

    A descendant whose parent exits is reparented here instead of to init: this process
    can then ``waitpid`` it, and a pid it reaps itself cannot be reused before it does.
    """
    _call(_PR_SET_CHILD_SUBREAPER, 1)


def set_name(name: str) -> None:
    """Set this thread's name as ``ps``/``top`` show it (``/proc/PID/comm``; 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _call(_PR_SET_NAME, ctypes.addressof(buf))
