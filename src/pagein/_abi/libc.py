"""The one libc handle, for the few calls the stdlib lacks (mmap at an address, ioctl on
a pointer, mincore, madvise on any range, the raw ``syscall``), and the handful of
ctypes primitives the ``sys`` layer needs (errno, struct addresses, raw memory views).

ctypes lives here and in the other ``_abi`` modules only; ``sys/`` calls these names.
Every function declared with ``argtypes`` below is a foreign call made with the GIL
released, so a call that blocks on a userfaultfd-registered page (``memmove``,
``madvise``, ``ioctl``) does not stall the other Python threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

c_void_p = ctypes.c_void_p
c_size_t = ctypes.c_size_t
c_int = ctypes.c_int
c_long = ctypes.c_long
c_ulong = ctypes.c_ulong

# The errno of the last foreign call of this thread (ctypes' private copy, use_errno=True).
get_errno = ctypes.get_errno
# The address of a ctypes struct instance, to hand to an ioctl.
addressof = ctypes.addressof
# memmove(dst, src, n) on raw addresses or buffers; a CFUNCTYPE, so the GIL is released.
memmove = ctypes.memmove

mmap = libc.mmap
mmap.restype = c_void_p
mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long]

munmap = libc.munmap
munmap.restype = c_int
munmap.argtypes = [c_void_p, c_size_t]

mremap = libc.mremap
mremap.restype = c_void_p
mremap.argtypes = [c_void_p, c_size_t, c_size_t, c_int, c_void_p]

madvise = libc.madvise
madvise.restype = c_int
madvise.argtypes = [c_void_p, c_size_t, c_int]

mincore = libc.mincore
mincore.restype = c_int
mincore.argtypes = [c_void_p, c_size_t, ctypes.POINTER(ctypes.c_ubyte)]

mprotect = libc.mprotect
mprotect.restype = c_int
mprotect.argtypes = [c_void_p, c_size_t, c_int]

prctl = libc.prctl
prctl.restype = c_int
prctl.argtypes = [c_int, c_ulong, c_ulong, c_ulong, c_ulong]
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
# A NUL-terminated copy of bytes, whose address a foreign call may read.
string_buffer = ctypes.create_string_buffer

# ioctl(fd, request, pointer-or-integer): ctypes releases the GIL around the call.
ioctl_ptr = libc.ioctl
ioctl_ptr.restype = c_int
ioctl_ptr.argtypes = [c_int, c_ulong, c_void_p]

syscall = libc.syscall
syscall.restype = c_long

sched_setaffinity = libc.sched_setaffinity

SYS_process_madvise = 440  # x86-64, Linux 5.10+


class iovec(ctypes.Structure):  # the kernel's name (<sys/uio.h>)
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def process_madvise_one(pidfd: int, address: int, length: int, advice: int) -> int:
    """``process_madvise(pidfd, &iov, 1, advice, 0)`` on one range of the pidfd's process;
    the bytes advised, or -1 and errno. Runs with the GIL released (a collapse copies
    2 MiB and may wait for the target's mmap lock)."""
    iov = iovec(address, length)
    return int(syscall(c_long(SYS_process_madvise), c_int(pidfd), ctypes.byref(iov),
                       c_size_t(1), c_int(advice), ctypes.c_uint(0)))

# The value mmap/mremap return on failure, as ctypes' c_void_p decodes it.
VOID_P_FAILED = ctypes.c_void_p(-1).value


def syscall1(nr: int, arg: int) -> int:
    """Call ``syscall(nr, arg)`` with one ``int`` argument; -1 and errno on failure."""
    return int(syscall(c_long(nr), c_int(arg)))


def memory_view(address: int, length: int) -> memoryview:
    """Return a writable ``B``-format memoryview over ``length`` bytes at ``address``.

    Safety: nothing keeps the memory alive; the view must not outlive the mapping.
    """
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def byte_vector(n: int) -> ctypes.Array[ctypes.c_ubyte]:
    """Return a zeroed ``unsigned char[n]`` (the vector ``mincore`` fills)."""
    return (ctypes.c_ubyte * n)()


def read_memory(address: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``address`` into a new ``bytes``, with the GIL released.

    Safety: ``[address, address+length)`` must be mapped and readable.
    """
    buf = bytearray(length)
    if length:
        memmove((ctypes.c_char * length).from_buffer(buf), address, length)
    return bytes(buf)


def write_memory(address: int, data: bytes | bytearray | memoryview) -> None:
    """Copy ``data`` to ``address`` with the GIL released.

    Safety: ``[address, address+len(data))`` must be mapped and writable.
    """
    if isinstance(data, bytes):
        if data:
            memmove(address, data, len(data))
        return
    view = memoryview(data).cast("B")
    n = view.nbytes
    if not n:
        return
    if view.readonly:
        memmove(address, bytes(view), n)
    else:
        memmove(address, (ctypes.c_char * n).from_buffer(view), n)


def buffer_address(buf: bytearray | memoryview) -> int:
    """Return the address of the first byte of a writable buffer (e.g. a fill's ``src``).

    Safety: the address is valid only while ``buf`` is alive and not resized.
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
