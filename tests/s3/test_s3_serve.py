"""Lazy restore straight from SeaweedFS: the real fault server with an s3:// source."""

from __future__ import annotations

import ctypes
import os
import random
import sys
import uuid
from pathlib import Path

import pytest
from seaweed_server import BUCKET, Weed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagein.serve.local import restore_lazily
from pagein.snapshot.store import ops
from pagein.snapshot.store.layout import StoreOptions, open_backend
from serve_harness import client, finish, make_snapshot, start_server, touch_args

pytestmark = [pytest.mark.s3, pytest.mark.kernel]

CS = 64 << 10


def test_restore_lazily_from_s3_every_byte(weed_server: Weed, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(3)
    content = b"".join(bytes(CS) if i % 4 == 1 else rnd.randbytes(CS // 4) * 4
                       for i in range(24))
    (tmp_path / "mem").write_bytes(content)
    store_url = f"s3://{BUCKET}/serve-{uuid.uuid4().hex[:8]}"
    ops.push(open_backend(store_url, StoreOptions(endpoint_url=weed_server.endpoint)),
             tmp_path / "mem", "vm", chunk_size=CS)
    # The handler process finds the store the standard way: from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed_server.endpoint)
    monkeypatch.setenv("PAGEIN_CACHE_DIR", str(tmp_path / "cache"))
    with restore_lazily(f"{store_url}/vm") as restored:
        out = ctypes.create_string_buffer(len(content))
        # memmove drops the GIL while the handler process serves the faults.
        ctypes.memmove(out, restored.mapping.address, len(content))
        assert out.raw == content
        restored.check()
    assert len(list((tmp_path / "cache").rglob("*.zst"))) == 18  # 24 chunks, 6 all-zero


def test_serve_flags_name_the_endpoint_the_profile_and_the_cache(
        weed_server: Weed, tmp_path: Path) -> None:
    """``--endpoint-url``, ``--profile`` and ``--cache-dir`` on the command line reach a
    store the server's environment knows nothing of (no endpoint, no keys)."""
    size = 512 << 10
    mem = str(tmp_path / "mem")
    make_snapshot(mem, size)
    store_url = f"s3://{BUCKET}/flags-{uuid.uuid4().hex[:8]}"
    ops.push(open_backend(store_url, StoreOptions(endpoint_url=weed_server.endpoint)),
             Path(mem), "vm", chunk_size=CS)
    creds = tmp_path / "credentials"
    creds.write_text(f"[pagein-test]\naws_access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n")
    env = {k: v for k, v in os.environ.items() if k not in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PAGEIN_CACHE_DIR")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    cache = tmp_path / "cache"
    server = start_server(str(tmp_path), mem, "--endpoint-url", weed_server.endpoint,
                          "--profile", "pagein-test", "--cache-dir", str(cache),
                          "--workers", "1", source=f"{store_url}/vm", env=env)
    try:
        rc, res = finish(client(*touch_args(server, mem, [(0, size)], "--threads", "1")))
        assert rc == 0 and res["ok"] and res["pages"] == size // 4096, res
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert any(cache.rglob("*.zst"))  # the chunks went through the cache named
