"""Argparse types for who may connect: uids, gids (numbers or names) and octal modes."""

from __future__ import annotations

import argparse
import grp
import pwd

_MAX_IDS = 1024  # one flag's comma list; more is a mistake, not a policy
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel, never a user


def _one(item: str, kind: str, lookup: str) -> int:
    if item.isascii() and item.isdigit():
        value = int(item)
        if value > _MAX_ID:
            raise argparse.ArgumentTypeError(f"{kind} {item} is out of range (at most {_MAX_ID})")
        return value
    try:
        if lookup == "user":
            return pwd.getpwnam(item).pw_uid
        return grp.getgrnam(item).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{item!r} is neither a {kind} nor a {lookup} name on this machine") from None


def _many(text: str, kind: str, lookup: str) -> list[int]:
    items = [t.strip() for t in text.split(",")]
    if len(items) > _MAX_IDS or not all(items):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not a comma list of {kind}s or {lookup} names, e.g. 0,1000")
    return [_one(t, kind, lookup) for t in items]


def uid_list(text: str) -> list[int]:
    """``1000``, ``firecracker`` or ``1000,1001``: uids (user names looked up)."""
    return _many(text, "uid", "user")


def gid_list(text: str) -> list[int]:
    """``1000``, ``kvm`` or ``1000,kvm``: gids (group names looked up)."""
    return _many(text, "gid", "group")


def gid(text: str) -> int:
    """One gid or group name."""
    return _one(text.strip(), "gid", "group")


def octal_mode(text: str) -> int:
    """``660`` or ``0660`` (octal) as a permission mode, at most 0777."""
    t = text.strip().removeprefix("0o")
    try:
        mode = int(t, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not an octal permission mode between 0 and 777, e.g. 0660")
    return mode
