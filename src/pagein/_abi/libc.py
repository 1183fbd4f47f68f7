"""The one libc handle, for the few calls the stdlib lacks (mmap at an address, ioctl on
a pointer, mincore, madvise on any range, the raw ``syscall``)."""

from __future__ import annotations

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

c_void_p = ctypes.c_void_p
c_size_t = ctypes.c_size_t
c_int = ctypes.c_int
c_long = ctypes.c_long
c_ulong = ctypes.c_ulong

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

# ioctl(fd, request, pointer): ctypes releases the GIL around the call.
ioctl_ptr = libc.ioctl
ioctl_ptr.restype = c_int
ioctl_ptr.argtypes = [c_int, c_ulong, c_void_p]

syscall = libc.syscall
syscall.restype = c_long

sched_setaffinity = libc.sched_setaffinity
