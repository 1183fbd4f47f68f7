"""Store settings on ``pagein serve``'s command line (issue 17): ``--cache-dir`` and
``--cache-size`` instead of host-wide environment variables, the host cache never
growing past its bound, and the settings refused where they mean nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
CHUNK = 64 << 10
PAGEIN = [sys.executable, "-m", "pagein"]


def _cache_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*.zst"))


def test_cache_dir_and_cache_size_bound_the_host_cache(tmp_path: Path) -> None:
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, SIZE, hole_every=0)  # random bytes: chunks barely compress
    store = f"dir://{tmp_path / 'store'}"
    subprocess.run([*PAGEIN, "store", "push", mem, "vm1", "--store", store, "--chunk-size",
                    "64K", "-q"], check=True, capture_output=True, timeout=120)
    cache, env_cache = tmp_path / "cache", tmp_path / "env-cache"
    bound = 4 * CHUNK  # a quarter of the snapshot
    env = {**os.environ, "PAGEIN_CACHE_DIR": str(env_cache)}  # the flag wins over it
    server = start_server(str(tmp_path), mem, "--cache-dir", str(cache), "--cache-size",
                          str(bound), "--workers", "1", source=f"{store}/vm1", env=env)
    try:
        rc, res = finish(client(*touch_args(server, mem, [(0, SIZE)], "--threads", "1")))
        assert rc == 0 and res["ok"] and res["pages"] == SIZE // 4096, res  # every byte
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    held = _cache_bytes(cache)
    # Every chunk went through the cache (16 of 64 KiB) and the oldest were deleted:
    # without --cache-size the 8 GiB default would have kept all 16.
    assert 0 < held <= bound, held
    assert not env_cache.exists() or _cache_bytes(env_cache) == 0


@pytest.mark.parametrize("flag", [["--cache-dir", "/tmp/x"], ["--cache-size", "1G"],
                                  ["--endpoint-url", "http://127.0.0.1:1"],
                                  ["--profile", "p"]])
def test_store_settings_with_a_file_source_are_one_line_naming_the_flag(
        tmp_path: Path, flag: list[str]) -> None:
    mem = str(tmp_path / "mem.snap")
    make_snapshot(mem, 64 << 10)
    r = subprocess.run([*PAGEIN, "serve", "--socket", str(tmp_path / "s.sock"), "--mem-file",
                        mem, *flag], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r
    assert r.stderr.startswith(f"pagein: error: {flag[0]} applies to s3:// and dir:// "
                               "sources only"), r.stderr
    assert not (tmp_path / "s.sock").exists()
