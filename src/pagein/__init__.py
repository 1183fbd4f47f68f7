"""pagein: lazy restore of memory snapshots on Linux through userfaultfd.

Layers (imports go downward only)::

    cli -> lab, vmm -> serve -> snapshot -> sys -> _abi

The user documentation is the project's README.md and docs/ (serve.md: the fault server
and its protocol; restore.md, vmm.md, store.md, lab.md).
"""

__version__ = "0.1.0"
