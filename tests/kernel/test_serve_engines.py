"""Which fault engine serves: native unless asked otherwise, said in the stats, never a
silent fallback (CI builds the extension, so a fallback there is a failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagein.serve.engine import EngineName
from pagein.serve.session import native_unavailable
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

REGIONS = [(0, 1 << 20)]


def _serve_once(tmp_path: Path, *extra: str) -> dict[str, object]:
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, 1 << 20)
    server = start_server(str(tmp_path), mem, "--exit-after", "1", *extra)
    try:
        rc, res = finish(client(*touch_args(server, mem, REGIONS, "--threads", "2")))
        assert rc == 0 and res["ok"], res
        server.proc.wait(30)
        return server.stats()
    finally:
        server.stop()


def test_the_native_engine_is_built_and_serves_by_default(tmp_path: Path) -> None:
    assert native_unavailable() is None  # scripts/install.sh builds it
    expected = EngineName.default().value  # native, or python in the PAGEIN_ENGINE pass
    stats = _serve_once(tmp_path)
    assert stats["engine"] == expected
    vms = stats["vms"]
    assert isinstance(vms, list) and [vm["engine"] for vm in vms] == [expected]
    assert "engine: python (" not in (tmp_path / "server.log").read_text()


def test_engine_python_is_used_when_asked(tmp_path: Path) -> None:
    stats = _serve_once(tmp_path, "--engine", "python")
    assert stats["engine"] == "python"
    vms = stats["vms"]
    assert isinstance(vms, list) and vms[0]["engine"] == "python"
    assert vms[0]["pages"] == (1 << 20) // 4096


def test_default_engine_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEIN_ENGINE", "python")
    assert EngineName.default() is EngineName.PYTHON
    monkeypatch.setenv("PAGEIN_ENGINE", "native")
    assert EngineName.default() is EngineName.NATIVE
