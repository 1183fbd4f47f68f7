"""Guest images: build the C workloads with the system gcc, cache them, load their ELF.

Sources live in ``pagein/guest``. A build is keyed by the SHA-256 of the sources, the
compiler's version and the flags, and cached under ``$PAGEIN_CACHE/guest`` (default
``$XDG_CACHE_HOME/pagein/guest``, else ``~/.cache/pagein/guest``), so a second run costs
nothing and a changed source rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pagein.errors import Unavailable
from pagein.vmm.layout import IMAGE_BASE, IMAGE_LIMIT

GUEST_SRC = Path(__file__).resolve().parent.parent / "guest"
COMMON_SOURCES = ("start.S", "lib.c")
WORKLOAD_SOURCES = {"hello": ("hello.c",), "function": ("function.c",), "scan": ("scan.c",)}
CFLAGS = ("-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
          "-fno-builtin", "-Wall", "-Wextra", "-Werror", "-Wl,--build-id=none",
          "-Wl,-z,noexecstack")


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD segment: ``data`` at ``address``, then zeros up to ``memory_size``."""

    address: int
    data: bytes
    memory_size: int


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A linked guest workload ready to copy into guest memory."""

    name: str
    path: Path
    entry: int
    segments: tuple[Segment, ...]


def cache_dir() -> Path:
    if root := os.environ.get("PAGEIN_CACHE"):
        return Path(root) / "guest"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pagein" / "guest"


def _compiler(cc: str) -> tuple[str, str]:
    path = shutil.which(cc)
    if path is None:
        raise Unavailable(f"no C compiler '{cc}' on PATH: install gcc (apt-get install gcc) "
                          "to build the guest workloads")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path, out.stdout.splitlines()[0] if out.stdout else cc


def build(name: str, *, cc: str = "gcc", cache: Path | None = None) -> Path:
    """Build workload ``name`` (or reuse the cached build) and return its ELF path.

    Raises :class:`~pagein.errors.Unavailable` without a compiler and ``ValueError``
    for an unknown workload; a compile error raises ``RuntimeError`` with gcc's output.
    """
    if name not in WORKLOAD_SOURCES:
        raise ValueError(f"unknown workload {name!r}: choose one of "
                         f"{', '.join(sorted(WORKLOAD_SOURCES))}")
    compiler, version = _compiler(cc)
    sources = [*COMMON_SOURCES, *WORKLOAD_SOURCES[name]]
    digest = hashlib.sha256(version.encode() + " ".join(CFLAGS).encode())
    for f in sorted({*sources, "pagein_guest.h", "guest.ld"}):
        digest.update(f.encode() + b"\0" + (GUEST_SRC / f).read_bytes())
    out_dir = (cache or cache_dir()) / digest.hexdigest()[:16]
    target = out_dir / f"{name}.elf"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_elf = Path(tmp) / f"{name}.elf"
        cmd = [compiler, *CFLAGS, "-I", str(GUEST_SRC), "-T", str(GUEST_SRC / "guest.ld"),
               *(str(GUEST_SRC / s) for s in sources), "-o", str(tmp_elf)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"building guest workload {name!r} failed:\n{res.stderr}")
        os.replace(tmp_elf, target)  # atomic: concurrent builders never see half a file
    return target


def build_all(*, cc: str = "gcc", cache: Path | None = None) -> dict[str, Path]:
    """Build every workload; return name → ELF path."""
    return {name: build(name, cc=cc, cache=cache) for name in sorted(WORKLOAD_SOURCES)}


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1


def load_elf(path: Path, name: str = "") -> GuestImage:
    """Parse a static x86-64 ELF executable into its loadable segments.

    Raises ``ValueError`` naming the file when it is not one, or when a segment falls
    outside the image window of the guest layout.
    """
    data = path.read_bytes()
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian 64-bit ELF file")
    (_, etype, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_) = _EHDR.unpack_from(data)
    if etype != 2 or machine != 62:
        raise ValueError(f"{path} is not an x86-64 executable (type {etype}, machine {machine})")
    segments = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + _PHDR.size > len(data):
            raise ValueError(f"{path}: program header {i} is truncated")
        ptype, _, offset, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(data, off)
        if ptype != _PT_LOAD:
            continue
        if paddr < IMAGE_BASE or paddr + memsz > IMAGE_LIMIT or offset + filesz > len(data):
            raise ValueError(f"{path}: segment at 0x{paddr:x}+0x{memsz:x} is outside the "
                             f"guest image window 0x{IMAGE_BASE:x}-0x{IMAGE_LIMIT:x}")
        segments.append(Segment(paddr, data[offset:offset + filesz], memsz))
    return GuestImage(name or path.stem, path, entry, tuple(segments))


def workload_image(name: str) -> GuestImage:
    """Build (or reuse) and load workload ``name``."""
    return load_elf(build(name), name)
