"""The built-in guest workloads and their arguments (``key=value`` on the command line).

Each workload turns its named arguments into the integer ``args`` of the parameter page
(see the comment at the top of each ``pagein/guest/<name>.c``) and says how much heap it
needs, so a too-small guest is refused before it starts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

RECORD_BYTES = 64
PAGE = 4096


class Pattern(enum.IntEnum):
    SEQUENTIAL = 0
    RANDOM = 1
    STRIDED = 2
    HOTSET = 3


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1


_PATTERN_NAMES = {"seq": Pattern.SEQUENTIAL, "sequential": Pattern.SEQUENTIAL,
                  "random": Pattern.RANDOM, "stride": Pattern.STRIDED,
                  "strided": Pattern.STRIDED, "hotset": Pattern.HOTSET, "hot": Pattern.HOTSET}


@dataclass(frozen=True, slots=True)
class WorkloadArgs:
    """A workload with its parameter-page arguments and the heap it needs."""

    name: str
    args: tuple[int, ...]
    min_heap_bytes: int


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``64k`` or plain bytes → bytes (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number of bytes like 512M or 1G") from None


def function_table_capacity(records: int) -> int:
    """Hash table slots for ``records``: the power of two >= 2x (as function.c)."""
    return 1 << max(0, (2 * records - 1).bit_length()) if records else 1


def function_args(state_bytes: int = 64 << 20, seed: int = 1) -> WorkloadArgs:
    records = state_bytes // RECORD_BYTES
    if records == 0:
        raise ValueError(f"function state={state_bytes} must hold at least one "
                         f"{RECORD_BYTES}-byte record")
    heap = records * RECORD_BYTES + function_table_capacity(records) * 4
    return WorkloadArgs("function", (state_bytes, seed), heap)


def scan_args(pattern: Pattern = Pattern.SEQUENTIAL, op: Op = Op.READ, size_bytes: int = 0,
              touches: int = 0, stride_pages: int = 16, hot_percent: int = 10,
              seed: int = 1) -> WorkloadArgs:
    if size_bytes % PAGE:
        raise ValueError(f"scan size={size_bytes} must be a multiple of {PAGE}")
    if not 0 <= hot_percent <= 100:
        raise ValueError(f"scan hot={hot_percent} must be a percentage (0-100)")
    args = (int(pattern), int(op), size_bytes, touches, stride_pages, hot_percent, seed)
    return WorkloadArgs("scan", args, max(size_bytes, PAGE))


class Fault(enum.IntEnum):
    """What ``hello`` does wrong on purpose (``guest/hello.c``), to test error reports."""

    NONE = 0
    STORE = 1   # store to an address: NULL or beyond RAM faults
    HLT = 2     # privileged at CPL 3
    SSE = 3     # fine at CPL 3; kvm_pvm cannot emulate it at CPL 0
    UD2 = 4
    SPIN = 5    # loop forever without a VM exit


def hello_args(status: int = 0, fault: Fault = Fault.NONE, address: int = 0) -> WorkloadArgs:
    return WorkloadArgs("hello", (status, int(fault), address), 0)


def parse_workload(name: str, items: Iterable[str]) -> WorkloadArgs:
    """Parse ``key=value`` items for workload ``name`` (ValueError names the bad item)."""
    kv: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"workload argument {item!r} must look like key=value")
        kv[key.strip().lower()] = value.strip()
    allowed = {"function": {"state", "seed"}, "hello": {"status"},
               "scan": {"pattern", "op", "size", "touches", "stride", "hot", "seed"}}
    if name not in allowed:
        raise ValueError(f"unknown workload {name!r}: choose one of {', '.join(allowed)}")
    if unknown := set(kv) - allowed[name]:
        raise ValueError(f"workload {name!r} has no argument {sorted(unknown)[0]!r} "
                         f"(it takes {', '.join(sorted(allowed[name]))})")
    if name == "function":
        return function_args(parse_size(kv.get("state", "64M")), int(kv.get("seed", "1"), 0))
    if name == "hello":
        return hello_args(int(kv.get("status", "0"), 0))
    pattern = kv.get("pattern", "seq")
    if pattern not in _PATTERN_NAMES:
        raise ValueError(f"scan pattern={pattern!r} must be one of seq, random, stride, hotset")
    op = kv.get("op", "read")
    if op not in ("read", "write"):
        raise ValueError(f"scan op={op!r} must be read or write")
    return scan_args(_PATTERN_NAMES[pattern], Op[op.upper()], parse_size(kv.get("size", "0")),
                     int(kv.get("touches", "0"), 0), int(kv.get("stride", "16"), 0),
                     int(kv.get("hot", "10"), 0), int(kv.get("seed", "1"), 0))
