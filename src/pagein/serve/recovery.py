"""Replacing a serving worker that died without its VMs noticing: why it is safe.

The supervisor holds every VM's uffd, VMM socket and serving state
(:mod:`pagein.serve.state`: filled and discarded pages, counters, the event journal,
the live extents) for as long as the VM lives. When a worker dies (SIGKILL, a crash, an
exception) the supervisor starts another and hands it the same three fds with
``resume``; the new session applies what the journal holds, wakes every live range once
and goes on with its strategy. The kernel keeps everything else: unread messages stay
queued in the uffd, installed pages stay installed. Case by case:

1. **Faults the dead worker had read but not served.** Their threads still sleep in the
   kernel, and their messages are gone. The successor wakes every live range once
   (``UFFDIO_WAKE``): each sleeper retries its access and, its page still missing,
   faults again, now to the successor. Waking a range nobody waits on does nothing.
2. **A fill the dead worker had begun.** ``UFFDIO_COPY`` installs whole pages atomically;
   a multi-page copy cut short leaves a prefix of whole pages. A page's ``filled`` bit
   is set only after its ioctl returned, so a page can be installed with its bit clear
   (the successor fills it again: EEXIST, and a wake), never marked without being
   there. A page is never half there.
3. **A REMOVE (balloon) while no worker ran.** The event waits, unread, in the uffd
   queue; while it does, every fill fails with EAGAIN, so nothing stale can be
   installed over it. The successor reads it like any other event.
4. **A REMOVE the dead worker had read but not applied.** Reading it let the kernel zap
   the range, so the successor must know of it or it would copy stale snapshot bytes
   where the guest expects zeros. Engines ``read()`` straight into the VM's journal in
   shared memory: the event is on record the moment the syscall returns, before any
   user-space instruction could be interrupted. Slots are cleared only after the
   session has applied the events (discarded bits set, extents saved), so a successor
   re-applies whatever the journal still holds; applying a REMOVE, UNMAP or REMAP twice
   is harmless (marking pages again; cutting a range already cut; moving a range whose
   old address no longer maps anything). Faults are never kept there (case 1).
5. **Background plans.** A working-set prefetch or populate-all starts again from the
   top of its plan, and every page already filled is skipped by its bitmap: it resumes
   where it was at the cost of scanning bits, not of copying pages again.
6. **UNMAP/REMAP.** The extents are saved in the state before the journal slot of the
   event is cleared; the successor starts from them.
7. **A child uffd from a FORK event** read by the dead worker is lost with its fd
   table: logged (pagein never serves forked children anyway).
8. **A worker that keeps dying on the same VM** (a corrupt chunk, a source truncated
   under the server): each VM counts the crashes of workers serving it. After the first,
   a VM goes back to a worker with the others; a VM caught in a second crash goes to a
   worker of its own, so a third crash there names it alone. A VM past
   ``max_restarts`` fails: logged, in the stats and metrics, and (by default) its VMM is
   killed through the pidfd taken at accept; the other VMs go on. A worker of its own
   ends when its VM does.
8b. **Recording** (``--record``): the fault records of a dead worker are lost with it;
   the successor records from the crash on (logged): a working set is best recorded on
   a restore nobody kills. Serving is not affected.
9. **The supervisor dying** ends its workers (they see their control channel close):
   the VMs freeze, loudly, never reading zero pages, because each VMM keeps its own copy
   of its uffd (Firecracker does). Nothing here can recover that; a service manager
   that holds the fds (systemd's file-descriptor store) could.

The tests kill real workers at the points of cases 1, 2, 4, 5 and 6 (the
:mod:`pagein.serve.crash` points ``serve``, ``fill``, ``event`` after a REMOVE and after
a REMAP, ``prefetch``), every ~100 ms through a restore with a balloon and writes (case
3), and again and again on one VM (case 8), checking every byte the VM reads.
"""

from __future__ import annotations

import logging
import struct

from pagein.serve.engine import CoreEvent, EventTuple

__all__ = ["journal_events"]

log = logging.getLogger("pagein.serve")

_MSG = struct.Struct("=B7xQQQ")  # uffd_msg: u8 event, 7 reserved bytes, then the union
_PAGEFAULT = 0x12


def journal_events(journal: memoryview) -> list[EventTuple]:
    """The non-fault events a journal still holds, in slot order, as engine tuples.

    A FORK's child fd belonged to the dead worker's fd table: it is reported with fd -1.
    """
    out: list[EventTuple] = []
    for i in range(len(journal) // _MSG.size):
        kind, a, b, c = _MSG.unpack_from(journal, i * _MSG.size)
        if kind in (0, _PAGEFAULT):
            continue
        if kind == CoreEvent.FORK:
            log.warning("a forked child's uffd was lost with the worker that read it")
            out.append((kind, -1, 0, 0))
        elif kind == CoreEvent.REMAP:
            out.append((kind, a, b, c))
        elif kind in (CoreEvent.REMOVE, CoreEvent.UNMAP):
            out.append((kind, a, b, 0))
    return out
