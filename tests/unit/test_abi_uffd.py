"""Pin every uffd struct layout, ioctl number and flag against the kernel headers.

What the system's ``<linux/userfaultfd.h>`` defines is checked against a C probe
compiled here with gcc. Newer names than Debian 12's 6.1 headers carry are checked
against :data:`UPSTREAM`, a table copied from upstream Linux
``include/uapi/linux/userfaultfd.h`` (v6.8+, torvalds/linux; UFFDIO_POISON and the
WP_UNPOPULATED/POISON/WP_ASYNC feature bits as added in 6.4-6.7, UFFDIO_MOVE and
UFFD_FEATURE_MOVE as added in 6.8). When the system headers define one of those
names too, the probe value is checked as well.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pagein._abi import mman
from pagein._abi import uffd as abi
from pagein._abi.ioctl import io, ior, iow, iowr

STRUCTS: dict[str, tuple[type[ctypes.Structure], list[str]]] = {
    "uffdio_api": (abi.uffdio_api, ["api", "features", "ioctls"]),
    "uffdio_range": (abi.uffdio_range, ["start", "len"]),
    "uffdio_register": (abi.uffdio_register, ["range", "mode", "ioctls"]),
    "uffdio_copy": (abi.uffdio_copy, ["dst", "src", "len", "mode", "copy"]),
    "uffdio_zeropage": (abi.uffdio_zeropage, ["range", "mode", "zeropage"]),
    "uffdio_writeprotect": (abi.uffdio_writeprotect, ["range", "mode"]),
    "uffdio_continue": (abi.uffdio_continue, ["range", "mode", "mapped"]),
}

# C expression -> the Python value it must equal.
CONSTANTS: dict[str, int] = {
    "UFFD_API": abi.UFFD_API,
    "UFFDIO": abi.UFFDIO,
    "USERFAULTFD_IOC": abi.USERFAULTFD_IOC,
    "USERFAULTFD_IOC_NEW": abi.USERFAULTFD_IOC_NEW,
    "UFFD_USER_MODE_ONLY": abi.UFFD_USER_MODE_ONLY,
    "__NR_userfaultfd": abi.NR_USERFAULTFD_X86_64,
    "UFFDIO_API": abi.UFFDIO_API,
    "UFFDIO_REGISTER": abi.UFFDIO_REGISTER,
    "UFFDIO_UNREGISTER": abi.UFFDIO_UNREGISTER,
    "UFFDIO_WAKE": abi.UFFDIO_WAKE,
    "UFFDIO_COPY": abi.UFFDIO_COPY,
    "UFFDIO_ZEROPAGE": abi.UFFDIO_ZEROPAGE,
    "UFFDIO_WRITEPROTECT": abi.UFFDIO_WRITEPROTECT,
    "UFFDIO_CONTINUE": abi.UFFDIO_CONTINUE,
    "UFFD_EVENT_PAGEFAULT": abi.EventType.PAGEFAULT,
    "UFFD_EVENT_FORK": abi.EventType.FORK,
    "UFFD_EVENT_REMAP": abi.EventType.REMAP,
    "UFFD_EVENT_REMOVE": abi.EventType.REMOVE,
    "UFFD_EVENT_UNMAP": abi.EventType.UNMAP,
    "UFFD_PAGEFAULT_FLAG_WRITE": abi.PagefaultFlag.WRITE,
    "UFFD_PAGEFAULT_FLAG_WP": abi.PagefaultFlag.WP,
    "UFFD_PAGEFAULT_FLAG_MINOR": abi.PagefaultFlag.MINOR,
    "UFFDIO_REGISTER_MODE_MISSING": abi.RegisterMode.MISSING,
    "UFFDIO_REGISTER_MODE_WP": abi.RegisterMode.WP,
    "UFFDIO_REGISTER_MODE_MINOR": abi.RegisterMode.MINOR,
    "UFFDIO_COPY_MODE_DONTWAKE": abi.CopyMode.DONTWAKE,
    "UFFDIO_COPY_MODE_WP": abi.CopyMode.WP,
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE": abi.ZeropageMode.DONTWAKE,
    "UFFDIO_WRITEPROTECT_MODE_WP": abi.WriteprotectMode.WP,
    "UFFDIO_WRITEPROTECT_MODE_DONTWAKE": abi.WriteprotectMode.DONTWAKE,
    "UFFDIO_CONTINUE_MODE_DONTWAKE": abi.ContinueMode.DONTWAKE,
    **{f"_UFFDIO_{nr.name}": nr.value for nr in abi.IoctlNr
       if nr.name not in ("MOVE", "POISON")},
    **{f"UFFD_FEATURE_{f.name}": f.value for f in abi.Feature
       if f.name not in ("WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE")},
    "sizeof(struct uffd_msg)": abi.UFFD_MSG_SIZE,
    "offsetof(struct uffd_msg, event)": 0,
    "offsetof(struct uffd_msg, arg)": 8,
    "offsetof(struct uffd_msg, arg.pagefault.flags)": 8,
    "offsetof(struct uffd_msg, arg.pagefault.address)": 16,
    "offsetof(struct uffd_msg, arg.pagefault.feat.ptid)": 24,
    "offsetof(struct uffd_msg, arg.fork.ufd)": 8,
    "offsetof(struct uffd_msg, arg.remap.from)": 8,
    "offsetof(struct uffd_msg, arg.remap.to)": 16,
    "offsetof(struct uffd_msg, arg.remap.len)": 24,
    "offsetof(struct uffd_msg, arg.remove.start)": 8,
    "offsetof(struct uffd_msg, arg.remove.end)": 16,
}

# From upstream include/uapi/linux/userfaultfd.h (torvalds/linux, Linux 6.8+): names the
# 6.1 headers lack. Ioctl numbers are _IOWR(0xAA, nr, struct) spelled out in hex.
UPSTREAM: dict[str, int] = {
    "_UFFDIO_MOVE": 0x05,
    "_UFFDIO_POISON": 0x08,
    "UFFDIO_MOVE": 0xC028AA05,  # _IOWR(0xAA, 0x05, struct uffdio_move), 40 bytes
    "UFFDIO_POISON": 0xC020AA08,  # _IOWR(0xAA, 0x08, struct uffdio_poison), 32 bytes
    "UFFD_FEATURE_WP_UNPOPULATED": 1 << 13,
    "UFFD_FEATURE_POISON": 1 << 14,
    "UFFD_FEATURE_WP_ASYNC": 1 << 15,
    "UFFD_FEATURE_MOVE": 1 << 16,
    "UFFDIO_CONTINUE_MODE_WP": 1 << 1,
    "UFFDIO_POISON_MODE_DONTWAKE": 1 << 0,
    "UFFDIO_MOVE_MODE_DONTWAKE": 1 << 0,
    "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES": 1 << 1,
    "sizeof(struct uffdio_move)": 40,
    "sizeof(struct uffdio_poison)": 32,
}
# Struct sizes of newer structs are probed only when the headers define the ioctl.
GUARDS = {"sizeof(struct uffdio_move)": "UFFDIO_MOVE",
          "sizeof(struct uffdio_poison)": "UFFDIO_POISON"}
UPSTREAM_OFFSETS = {
    "uffdio_move": (abi.uffdio_move, {"dst": 0, "src": 8, "len": 16, "mode": 24, "move": 32}),
    "uffdio_poison": (abi.uffdio_poison, {"range": 0, "mode": 16, "updated": 24}),
}
OURS_UPSTREAM = {
    "_UFFDIO_MOVE": abi.IoctlNr.MOVE,
    "_UFFDIO_POISON": abi.IoctlNr.POISON,
    "UFFDIO_MOVE": abi.UFFDIO_MOVE,
    "UFFDIO_POISON": abi.UFFDIO_POISON,
    "UFFD_FEATURE_WP_UNPOPULATED": abi.Feature.WP_UNPOPULATED,
    "UFFD_FEATURE_POISON": abi.Feature.POISON,
    "UFFD_FEATURE_WP_ASYNC": abi.Feature.WP_ASYNC,
    "UFFD_FEATURE_MOVE": abi.Feature.MOVE,
    "UFFDIO_CONTINUE_MODE_WP": abi.ContinueMode.WP,
    "UFFDIO_POISON_MODE_DONTWAKE": abi.PoisonMode.DONTWAKE,
    "UFFDIO_MOVE_MODE_DONTWAKE": abi.MoveMode.DONTWAKE,
    "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES": abi.MoveMode.ALLOW_SRC_HOLES,
    "sizeof(struct uffdio_move)": ctypes.sizeof(abi.uffdio_move),
    "sizeof(struct uffdio_poison)": ctypes.sizeof(abi.uffdio_poison),
}

# <sys/mman.h>, <linux/mman.h>, <linux/memfd.h>: the mapping constants pagein uses.
MMAN: dict[str, int] = {
    **{f"PROT_{p.name}": p.value for p in mman.Prot if p.name != "NONE"},
    **{f"MAP_{f.name}": f.value for f in mman.MapFlag},
    **{f"MREMAP_{f.name}": f.value for f in mman.MremapFlag},
    **{f"MADV_{a.name}": a.value for a in mman.Advice},
    **{f"MFD_{f.name}": f.value for f in mman.MemfdFlag},
}
MMAN_HEADERS = "#define _GNU_SOURCE\n#include <sys/mman.h>\n#include <linux/mman.h>\n" \
               "#include <linux/memfd.h>\n"


def _probe(tmp_path: Path, headers: str, exprs: list[str]) -> dict[str, int]:
    """Compile and run a C program printing each expression, skipping undefined macros."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile the header probe: apt-get install gcc")
    lines = []
    for e in exprs:
        body = f'printf("%s=%llu\\n", "{e}", (unsigned long long)({e}));'
        guard = e if e.isidentifier() else GUARDS.get(e)
        if guard:  # print only when the headers define it
            body = f"#ifdef {guard}\n{body}\n#endif"
        lines.append(body)
    src = (f"{headers}#include <stddef.h>\n#include <stdio.h>\n"
           "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    (tmp_path / "probe.c").write_text(src)
    cc = subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True,
                         text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


UFFD_HEADERS = ("#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\n"
                "#include <sys/syscall.h>\n")


def test_struct_sizes_and_offsets_match_the_headers(tmp_path: Path) -> None:
    exprs = []
    for name, (_cls, fields) in STRUCTS.items():
        exprs.append(f"sizeof(struct {name})")
        exprs += [f"offsetof(struct {name}, {f})" for f in fields]
    got = _probe(tmp_path, UFFD_HEADERS, exprs)
    for name, (cls, fields) in STRUCTS.items():
        assert ctypes.sizeof(cls) == got[f"sizeof(struct {name})"], name
        for f in fields:
            assert getattr(cls, f).offset == got[f"offsetof(struct {name}, {f})"], (name, f)
    assert ctypes.sizeof(abi.uffd_msg) == abi.UFFD_MSG_SIZE == 32


def test_constants_and_ioctl_numbers_match_the_headers(tmp_path: Path) -> None:
    got = _probe(tmp_path, UFFD_HEADERS, list(CONSTANTS) + list(UPSTREAM))
    missing = [k for k in CONSTANTS if k not in got]
    assert not missing, f"the system headers lack {missing}"
    wrong = {k: (hex(v), hex(got[k])) for k, v in CONSTANTS.items() if int(v) != got[k]}
    assert not wrong, f"ours vs headers: {wrong}"
    # Newer names: when the system headers have them, they must agree with upstream.
    for k, v in UPSTREAM.items():
        if k in got:
            assert got[k] == v, k


def test_newer_than_system_headers_match_upstream_table() -> None:
    for k, v in UPSTREAM.items():
        assert int(OURS_UPSTREAM[k]) == v, k
    for name, (cls, offsets) in UPSTREAM_OFFSETS.items():
        for f, off in offsets.items():
            assert getattr(cls, f).offset == off, (name, f)


def test_uffd_msg_layout_matches_the_struct_format() -> None:
    import struct

    fmt = struct.Struct(abi.UFFD_MSG_FORMAT)
    assert fmt.size == 32
    msg = abi.uffd_msg
    arg = msg.arg.offset
    assert arg == 8
    assert abi._uffd_msg_pagefault.address.offset + arg == 16
    assert abi._uffd_msg_pagefault.ptid.offset + arg == 24
    assert abi._uffd_msg_remap.len.offset + arg == 24


def test_ioctl_macros_follow_asm_generic() -> None:
    assert io(0xAA, 0) == 0xAA00
    assert ior(0xAA, 1, abi.uffdio_range) == 0x8010AA01
    assert iow(0xAE, 0x46, ctypes.c_uint64) == 0x4008AE46
    assert iowr(0xAA, 0x3F, abi.uffdio_api) == 0xC018AA3F


def test_mman_constants_match_the_headers(tmp_path: Path) -> None:
    got = _probe(tmp_path, MMAN_HEADERS, list(MMAN))
    wrong = {k: (v, got[k]) for k, v in MMAN.items() if k in got and got[k] != v}
    assert not wrong, f"ours vs headers: {wrong}"
    # Debian 12 headers know all of these; a newer name missing here is a typo.
    unknown = [k for k in MMAN if k not in got]
    assert not unknown, f"the headers do not define {unknown}"
