"""``pagein serve`` and its serving workers stay lean: they never import ``rich``.

Checked on a real server serving a real VMM, with ``PYTHONPROFILEIMPORTTIME=1``: every
interpreter of the server (the supervisor, the zygote and the workers it forks, which
inherit the setting) writes each module it imports to the server's log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 1 << 20


def test_the_server_and_its_workers_never_import_rich(tmp_path: Path) -> None:
    snap = str(tmp_path / "mem.snap")
    make_snapshot(snap, SIZE)
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    server = start_server(str(tmp_path), snap, "--metrics-port", "0", "--workers", "1",
                          env=env)
    try:
        rc, res = finish(client(*touch_args(server, snap, [(0, SIZE)], "--threads", "1")))
        assert rc == 0, res
    finally:
        server.stop()
    modules = [ln.rsplit("|", 1)[1].strip() for ln in server.log().splitlines()
               if ln.startswith("import time:") and ln.count("|") == 2]
    # The log does hold the imports of every interpreter: the supervisor's and the
    # zygote's (each prints this header once); a worker forked by the zygote logs there too.
    assert server.log().count("import time: self [us]") >= 2
    assert "pagein.serve.server" in modules and "pagein.serve.session" in modules
    assert "prometheus_client" in modules  # the supervisor, serving metrics
    assert not [m for m in modules if m == "rich" or m.startswith("rich.")]
