"""Lazy restore straight from SeaweedFS: the real fault server with an s3:// source."""

from __future__ import annotations

import ctypes
import random
import uuid
from pathlib import Path

import pytest
from seaweed_server import BUCKET, Weed

from pagein.serve.local import restore_lazily
from pagein.snapshot.store import ops
from pagein.snapshot.store.layout import StoreOptions, open_backend

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
