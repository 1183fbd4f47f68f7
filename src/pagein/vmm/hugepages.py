"""Check the hugetlb pool before 2 MiB-page guest memory is made, not inside ``KVM_RUN``.

Hugetlb pages come from one machine-wide pool (``vm.nr_hugepages``). Guest memory that
the kernel cannot back shows up late and far from its cause: ``mmap`` fails (``vm run``
reserves its pages), a ``preadv`` into ``MAP_NORESERVE`` memory says EFAULT halfway
through a copy, or a userfaultfd fill fails with ENOMEM while the guest runs (and that
guest freezes). So every way of making 2 MiB guest memory asks here first, and a pool
too small is one :class:`~pagein.errors.Unavailable` naming ``vm.nr_hugepages``, the
pages needed and the value to set.

How many pages each way needs (measured on Linux 6.18):

- ``vm run``: one per 2 MiB of RAM (its mapping reserves them all at ``mmap``).
- ``vm restore --backend copy``: the same (every page the guest may touch).
- ``vm restore --backend uffd``: the same **plus one spare**. A hugetlb ``UFFDIO_COPY``
  whose source page is not mapped in the handler yet copies into a transient huge page
  first; with the pool exactly full that last fill fails with ENOMEM (docs/serve.md).
- ``vm restore --backend file``: none. A regular file's page cache holds 4 KiB pages,
  so a private mapping of the memory file is never hugetlb memory.

The pool is compared with what it can give *now*: free pages not reserved by another
mapping, plus the surplus pages ``vm.nr_overcommit_hugepages`` still allows. Pages other
processes hold are not counted. The check cannot reserve anything (the guest memory is
``MAP_NORESERVE``, as Firecracker's is), so a pool emptied by someone else after it still
fails later; it turns the common case, a pool set too small, into a clear error at start.
"""

from __future__ import annotations

from pagein.errors import Unavailable
from pagein.sys.mapping import HUGE_PAGE_SIZE, hugetlb_pool, hugetlb_pool_size

__all__ = ["UFFD_SPARE_PAGES", "check_hugetlb_pool", "pool_shortage"]

#: Pages a userfaultfd restore needs beyond its guest memory (the transient fill page).
UFFD_SPARE_PAGES = 1


def pool_shortage(what: str, pages: int, *, spare: int = 0,
                  page_size: int = HUGE_PAGE_SIZE) -> str | None:
    """Return the error sentence when the pool cannot give ``pages + spare`` pages of
    ``page_size`` now (None: it can). ``what`` names the operation, e.g. "restoring
    snapshot /snap by copy"."""
    if pages <= 0:
        return None
    kib = page_size // 1024
    knob = f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
    pool = hugetlb_pool(page_size)
    if pool is None:
        return (f"{what} needs {kib} KiB hugetlb pages, but this kernel has no pool of "
                f"that size ({knob} is absent): use a kernel with CONFIG_HUGETLBFS")
    need = pages + spare
    can_give = pool[0] + pool[1]
    if can_give >= need:
        return None
    why = (f"{pages} pages of guest memory and {spare} spare, since a userfaultfd fill of a "
           "huge page can need a transient page") if spare else \
        f"one page per {kib} KiB of guest memory"
    total = hugetlb_pool_size(page_size)
    to = f"to {total + need - can_give} (now {total})" if total is not None else \
        f"by {need - can_give}"
    return (f"{what} needs {need} free {kib} KiB pages, the pool can give {can_give}: "
            f"raise vm.nr_hugepages {to}, or write {knob} ({why}; pages other processes "
            "hold are not free)")


def check_hugetlb_pool(what: str, pages: int, *, spare: int = 0,
                       page_size: int = HUGE_PAGE_SIZE) -> None:
    """Raise :class:`~pagein.errors.Unavailable` unless the pool can give ``pages`` (+
    ``spare``) pages of ``page_size`` now; see :func:`pool_shortage`."""
    if (error := pool_shortage(what, pages, spare=spare, page_size=page_size)) is not None:
        raise Unavailable(error)
