"""The fds of a control message are named (``"fds": [...]``) and checked on receipt:
a message whose names and fds disagree is refused, naming the fd, never served."""

from __future__ import annotations

import pytest

from pagein.serve.control import ControlError, name_fds
from pagein.serve.worker import VM_FDS, VM_OPTIONAL_FDS


def _named(names: object, fds: list[int]) -> dict[str, int]:
    return name_fds(names, fds, required=VM_FDS, optional=VM_OPTIONAL_FDS)


def test_each_fd_gets_its_name_whatever_the_order() -> None:
    assert _named(["state", "uffd", "pagemap", "socket"], [7, 5, 9, 6]) == \
        {"uffd": 5, "socket": 6, "state": 7, "pagemap": 9}


@pytest.mark.parametrize(("names", "fds", "words"), [
    (None, [5, 6, 7], "no list of their names"),
    (["uffd", "socket"], [5, 6, 7], "names 2 fds and carries 3"),
    (["uffd", "socket", "socket"], [5, 6, 7], "names an fd twice"),
    (["uffd", "socket", "state", "cache"], [5, 6, 7, 8], "unknown fd 'cache'"),
    (["uffd", "socket", "pagemap"], [5, 6, 7], "lacks the 'state' fd"),
])
def test_a_mismatch_is_refused_naming_the_fd(names: object, fds: list[int],
                                             words: str) -> None:
    with pytest.raises(ControlError, match=words):
        _named(names, fds)
