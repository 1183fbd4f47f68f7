"""Kernel ABI only: ctypes structs, constants and ioctl numbers. No logic, no I/O."""
