"""pagein: lazy restore of memory snapshots on Linux through userfaultfd.

Layers (imports go downward only)::

    cli -> lab, vmm -> serve -> snapshot -> sys -> _abi

See ``DESIGN.md`` of the project for the kernel and protocol facts the code respects.
"""

__version__ = "0.1.0"
