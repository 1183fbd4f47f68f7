"""Why a page arrived in guest memory: one vocabulary from the plan to the trace.

A strategy's plan spans carry a :class:`Cause`, the fault core accounts every fill by
it (counters, fill records), the trace file stores its ``label`` and ``pagein report``
colours by it. The integer values are the native core's ``CAUSE_*`` constants.
"""

from __future__ import annotations

import enum

__all__ = ["Cause"]


class Cause(enum.IntEnum):
    """How a page got into guest memory."""

    DEMAND = 0  # the page a vCPU faulted on
    READAHEAD = 1  # filled with a fault, around the faulting page
    PREFETCH = 2  # from the recorded working set
    BACKGROUND = 3  # a background plan (populate-all)
    ZERO = 4  # installed as zeros (snapshot hole or ballooned)

    @property
    def label(self) -> str:
        """The name in trace files and metrics labels (``demand``, ``zero``, ...)."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Cause:
        """Parse a trace file's label; ValueError if it is not one."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"{label!r} is not a fill cause") from None
