"""Process plumbing: ``prctl(2)`` (a subreaper, a process name) and the process tree as
``/proc`` shows it (children, descendants, children by name)."""

from __future__ import annotations

import os

from pagein._abi import libc

__all__ = ["children", "descendants", "live_children_named", "set_child_subreaper", "set_name"]


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


def children(pid: int) -> list[int]:
    """The children of ``pid`` (``/proc/PID/task/*/children``); [] once it is gone."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:  # the thread ended meanwhile
            continue
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents before their children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def live_children_named(pid: int, prefix: str) -> set[int]:
    """The children of ``pid`` whose name (``comm``) starts with ``prefix`` and that are
    not zombies: e.g. the ``pagein-worker<N>`` processes of a ``pagein serve``."""
    out = set()
    for kid in children(pid):
        try:
            with open(f"/proc/{kid}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        name = comm.split("(", 1)[1] if "(" in comm else comm
        if name.startswith(prefix) and rest.split()[0] != "Z":
            out.add(kid)
    return out
