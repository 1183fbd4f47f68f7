"""Tell URLs from paths in what a user types, and refuse what is neither.

A location is ``scheme://rest`` with a scheme the caller supports, or a plain path. Text
that starts like a URL without being one (``s3:/bucket``, ``s3:bucket``, ``dir:/srv``)
is refused rather than taken as a relative path: ``s3:/bucket`` would otherwise create a
local directory ``./s3:`` and push a snapshot into it, reporting success. A path whose
first component really contains a colon is written ``./name:with:colons``.

One form more is accepted where ``file`` is supported: ``file:/abs/path``, the short
form of a file URL (RFC 8089), meaning ``/abs/path``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pagein.errors import PageinError, SourceError

__all__ = ["split_location"]

# A scheme as RFC 3986 spells it: a letter, then letters, digits, "+", "-" or ".".
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def split_location(text: str, schemes: Sequence[str], *, what: str, forms: str = "",
                   error: type[PageinError] = SourceError) -> tuple[str | None, str]:
    """Return ``(scheme, rest)`` for ``scheme://rest``, or ``(None, text)`` for a path.

    ``what`` names the thing in messages ("snapshot source", "store URL"), ``forms`` the
    accepted forms (default: the schemes). Raises ``error``
    (:class:`~pagein.errors.SourceError`) for an unsupported scheme and for a URL
    look-alike, saying how to write the URL (or the path) meant.
    """
    m = _SCHEME.match(text)
    if m is None:
        return None, text
    scheme, after = m.group(1), text[m.end():]
    choices = ", ".join(f"{s}://" for s in schemes)
    if after.startswith("//"):
        if scheme not in schemes:
            raise error(f"{what} {text!r} has unknown scheme {scheme!r}: use "
                        f"{forms or choices + ' or a path'}")
        return scheme, after[2:]
    if scheme == "file" and "file" in schemes and after.startswith("/"):
        return "file", after
    slashes = "///" if scheme in ("dir", "file") else "//"  # these take absolute paths
    meant = f"{scheme}:{slashes}{after.lstrip('/')}" if scheme in schemes else \
        f"one of {choices}"
    raise error(f"{what} {text!r} looks like a URL but is not one (a URL has '//' after "
                      f"'{scheme}:'): write {meant}, or ./{text} for a local path")
