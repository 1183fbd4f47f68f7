"""A diff chain pushed to SeaweedFS (`pagein store push LAYER`) and served from it
(`pagein serve --source s3://...`) to a real `function` guest restored from the layer."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from seaweed_server import BUCKET, Weed

from pagein.snapshot.store import ops
from pagein.snapshot.store.layout import StoreOptions, open_backend, read_manifest
from pagein.sys.poll import wait_readable
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.reference import FunctionReference
from pagein.vmm.restore import RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import function_args

pytestmark = [pytest.mark.s3, pytest.mark.kvm]

MiB = 1 << 20
STATE, SEED, TIMEOUT = 2 * MiB, 5, 60.0
CHECKS = ("checksum", "sum 0 30000")


def _ask(m: Machine, request: str) -> str:
    m.console.send(request + "\n")
    line = m.console.read_line(TIMEOUT)
    assert line is not None
    return line


def _chain(root: Path) -> tuple[str, FunctionReference]:
    """A full snapshot and two diffs on it; the top layer and the reference there."""
    ref = FunctionReference(STATE, SEED)
    wa = function_args(STATE, SEED)
    with Machine.create(32 * MiB, 1) as m:
        m.enable_dirty_tracking()
        m.pause_on_ready = True
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        assert m.ready.wait(TIMEOUT)
        m.pause(TIMEOUT)
        save_snapshot(m, str(root / "l0"), workload=("function", wa.args))
        for i, req in enumerate(("update 3 900 11", "update 20000 20100 12"), 1):
            m.resume()
            assert _ask(m, req) == ref.answer(req)
            m.pause(TIMEOUT)
            save_snapshot(m, str(root / f"l{i}"), diff=True)
        m.resume()
    return str(root / "l2"), copy.deepcopy(ref)


def test_serve_from_s3_a_pushed_chain(weed_server: Weed, tmp_path: Path) -> None:
    top, ref = _chain(tmp_path)
    store = f"s3://{BUCKET}/chain-{uuid.uuid4().hex[:8]}"
    backend = open_backend(store, StoreOptions(endpoint_url=weed_server.endpoint))
    ops.push(backend, top, "vm", chunk_size=64 << 10)
    assert len(read_manifest(backend, "vm").layers) == 3
    sock = str(tmp_path / "serve.sock")
    env = {**os.environ, "AWS_ENDPOINT_URL": weed_server.endpoint,
           "PAGEIN_CACHE_DIR": str(tmp_path / "cache")}
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "pagein", "serve", "--socket", sock,
                             "--source", f"{store}/vm", "--ready-fd", str(w)], pass_fds=(w,),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert wait_readable([r], TIMEOUT) and os.read(r, 16), "serve did not start"
        with restore(top, RestoreOptions(uffd_socket=sock)) as vm:
            assert [_ask(vm.machine, q) for q in CHECKS] == [ref.answer(q) for q in CHECKS]
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(TIMEOUT)
    assert list((tmp_path / "cache").rglob("*.zst")), "nothing was fetched from the store"
