"""The base of every fd-owning resource: idempotent close, context manager, ResourceWarning."""

from __future__ import annotations

import os
import warnings
from types import TracebackType
from typing import Self


class OwnedFd:
    """Own one file descriptor; ``close()`` is idempotent."""

    _fd: int

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """Return the fd; raise ``ValueError`` once closed (so selectors notice)."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership of the fd and return it."""
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {type(self).__name__} fd={self._fd}", ResourceWarning,
                          stacklevel=2)
