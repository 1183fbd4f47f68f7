"""`pagein vm restore` names the real cause (issue 17): no working set recorded, the
memory file given in place of its directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from _guest import pagein_vm, snapshot_at_ready

TIMEOUT = 120



@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("messages") / "snap"
    snapshot_at_ready(d, state="1M", seed=3)
    return d


@pytest.mark.parametrize("strategy", ["working-set", "reap"])
def test_working_set_strategy_without_a_working_set(snap: Path, strategy: str) -> None:
    res = pagein_vm("restore", str(snap), "--strategy", strategy, stdin="checksum\n")
    assert res.returncode == 1
    assert res.stderr == (
        f"pagein: error: snapshot {snap} has no working set for --strategy {strategy}: record "
        f"one with `pagein vm restore {snap} --record {snap / 'working-set'}`, or pass "
        "--working-set FILE\n")


def test_a_missing_working_set_file_is_named(snap: Path, tmp_path: Path) -> None:
    ws = tmp_path / "nope.ws"
    res = pagein_vm("restore", str(snap), "--strategy", "working-set", "--working-set", str(ws))
    assert res.returncode == 1
    assert res.stderr.startswith(f"pagein: error: working set {ws} does not exist")


@pytest.mark.parametrize("name", ["memory", "vmstate"])
def test_a_file_of_the_snapshot_in_place_of_its_directory(snap: Path, name: str) -> None:
    res = pagein_vm("restore", str(snap / name))
    assert res.returncode == 1
    assert res.stderr == (f"pagein: error: {snap / name} is the snapshot's {name} file: pass "
                          f"the snapshot directory {snap} itself\n")


def test_a_missing_directory(tmp_path: Path) -> None:
    res = pagein_vm("restore", str(tmp_path / "nothing"))
    assert res.returncode == 1
    assert res.stderr.startswith(f"pagein: error: snapshot directory {tmp_path / 'nothing'} "
                                 "does not exist")
