"""A guest enters at CPL 3, talks through port I/O and exits with its status."""

from __future__ import annotations

import pytest

from pagein.vmm.image import workload_image
from pagein.vmm.layout import USER_CS
from pagein.vmm.machine import Machine

MiB = 1 << 20


@pytest.mark.parametrize("vcpus", [1, 4])
def test_hello_enters_at_cpl3_and_exits_with_status(vcpus: int) -> None:
    with Machine.create(32 * MiB, vcpus) as m:
        m.boot(workload_image("hello"), (7,))
        sregs = m.vcpus[0].get_sregs()
        assert sregs.cs.selector == USER_CS and sregs.cs.dpl == 3 and sregs.ss.dpl == 3
        m.start()
        result = m.wait(timeout=30)
        assert result.status == 7
        lines = m.console.output().decode().splitlines()
        assert lines == [f"hello from vcpu {i}" for i in range(vcpus)]
        assert result.exits["IoOut:EXIT"] == 1
        assert result.exits["IoIn:BARRIER"] == vcpus * vcpus
