"""A chain too fragmented to map: more runs of pages than ``vm.max_map_count`` allows.

Two layers own alternate pages, so the flattened chain has one run (one mapping) per
page. The chain is sized from the live limit (a few more pages than it), in sparse
files, so nothing here changes a sysctl of the shared machine. The page source reads
it with pread, the file backend refuses naming the limit and the number needed, and
``pagein serve`` serves it through a real userfaultfd.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest

from pagein.errors import Unavailable
from pagein.snapshot.chain import (
    LAYER_FILE,
    ChainReader,
    ChainSource,
    encode_layer,
    resolve_chain,
)
from pagein.sys.mapping import max_map_count
from pagein.vmm.layers import layer_doc, map_chain_private
from serve_harness import client, finish, start_server, touch_args

PAGE = 4096
NPAGES = (max_map_count() + 64) // 2 * 2
DATA = range(1000, 1064)          # the pages that hold data in both layers


def _chain(root: Path) -> tuple[str, bytes]:
    """Base (data at DATA, holes elsewhere) and one layer owning every odd page; return
    the layer's directory and the flattened bytes of pages DATA."""
    rng = random.Random(16)
    base, top = root / "base", root / "top"
    base.mkdir()
    top.mkdir()
    (base / "vmstate").write_bytes(b"the state file of the base (only hashed here)")
    (top / "vmstate").write_bytes(b"the state file of the layer")
    want = bytearray()
    for d in (base, top):
        with open(d / "memory", "wb") as f:
            f.truncate(NPAGES * PAGE)
    with open(base / "memory", "r+b") as fb, open(top / "memory", "r+b") as ft:
        for p in DATA:
            a, b = rng.randbytes(PAGE), rng.randbytes(PAGE)
            fb.seek(p * PAGE)
            fb.write(a)
            ft.seek(p * PAGE)
            ft.write(b)
            want += b if p % 2 else a
    pages = np.arange(NPAGES) % 2 == 1
    sha = hashlib.sha256((base / "vmstate").read_bytes()).hexdigest()
    doc = layer_doc((str(base), sha), str(top), NPAGES * PAGE, pages,
                    np.zeros(NPAGES, dtype=bool), "00" * 32)
    (top / LAYER_FILE).write_bytes(encode_layer(doc))
    return str(top), bytes(want)


@pytest.fixture(scope="module")
def fragmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    return _chain(tmp_path_factory.mktemp("fragmented"))


def test_a_chain_past_max_map_count_is_read_with_pread(fragmented: tuple[str, bytes]) -> None:
    top, want = fragmented
    with ChainSource(top) as src:
        assert len(src.chain.index) >= NPAGES > max_map_count()
        assert not src.mapped
        assert "read with pread" in src.describe()
        assert src.address_map() == (None, [])
        buf = bytearray(len(want))
        src.read_into(DATA.start * PAGE, memoryview(buf))
        assert bytes(buf) == want
        # Outside DATA the base is holes: its (even) pages read as zeros, one run each.
        assert src.zero_extents(4 * PAGE, 4 * PAGE) == [(4 * PAGE, PAGE), (6 * PAGE, PAGE)]


def test_the_file_backend_refuses_naming_max_map_count(fragmented: tuple[str, bytes]) -> None:
    top, _ = fragmented
    chain = resolve_chain(top)
    with pytest.raises(Unavailable, match=f"needs {len(chain.index)} memory mappings .* "
                                          f"vm.max_map_count {max_map_count()} .*--backend "
                                          "copy or uffd"):
        map_chain_private(chain)
    reader = ChainReader(chain)  # what the copy backend and squash read with
    try:
        buf = bytearray(2 * PAGE)
        reader.read_into((DATA.start + 1) * PAGE, memoryview(buf))
        with open(os.path.join(top, "memory"), "rb") as f:
            f.seek((DATA.start + 1) * PAGE)
            assert bytes(buf[:PAGE]) == f.read(PAGE)
    finally:
        reader.close()


def test_serve_serves_a_chain_past_max_map_count(fragmented: tuple[str, bytes],
                                                 tmp_path: Path) -> None:
    """Through a real userfaultfd: the touched pages are the flattened chain's."""
    top, want = fragmented
    expected = tmp_path / "flat"
    with open(expected, "wb") as f:
        f.truncate(NPAGES * PAGE)
        f.seek(DATA.start * PAGE)
        f.write(want)
    server = start_server(str(tmp_path), "", source=top)
    try:
        span = (DATA.start - 8) * PAGE, (len(DATA) + 16) * PAGE
        rc, out = finish(client(*touch_args(server, str(expected), [span], "--threads", "1")))
        assert rc == 0 and out["ok"], out
        assert out["pages"] == len(DATA) + 16
    finally:
        server.stop()
    assert "read with pread" in server.log()
