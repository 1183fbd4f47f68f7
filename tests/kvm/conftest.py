"""Fixtures for tests on the real /dev/kvm: skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(autouse=True)
def _need_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent on this machine")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no read/write permission on /dev/kvm")

