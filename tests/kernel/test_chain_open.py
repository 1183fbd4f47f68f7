"""Opening a chain reads the top layer's recorded index, and still checks every link.

Synthetic chains in sparse files, written through the real layer writer
(:func:`pagein.vmm.layers.layer_doc`): the flattened bytes equal a page-by-page walk of
the layers, with no layer's page bitmap decoded; a parent's layer file swapped for a
valid one of another chain is refused.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from pagein.errors import IntegrityError
from pagein.snapshot.chain import (
    LAYER_FILE,
    ChainReader,
    ChainSource,
    LayerDoc,
    encode_layer,
    resolve_chain,
)
from pagein.vmm.layers import layer_doc

PAGE, NPAGES = 4096, 96


def _layer(parent: Path, d: Path, rng: random.Random, oracle: list[bytes]) -> None:
    """A layer in ``d`` on ``parent`` changing random pages (some to zeros, left holes)."""
    d.mkdir()
    (d / "vmstate").write_bytes(rng.randbytes(64))
    pages = np.zeros(NPAGES, dtype=bool)
    zero = np.zeros(NPAGES, dtype=bool)
    with open(d / "memory", "wb") as f:
        f.truncate(NPAGES * PAGE)
        for p in rng.sample(range(NPAGES), rng.randrange(1, NPAGES // 3)):
            pages[p] = True
            if rng.random() < 0.2:
                zero[p], oracle[p] = True, bytes(PAGE)
                continue
            oracle[p] = rng.randbytes(PAGE)
            f.seek(p * PAGE)
            f.write(oracle[p])
    sha = hashlib.sha256((parent / "vmstate").read_bytes()).hexdigest()
    doc = layer_doc((str(parent), sha), str(d), NPAGES * PAGE, pages, zero, "00" * 32)
    (d / LAYER_FILE).write_bytes(encode_layer(doc))


def _base(d: Path, rng: random.Random) -> list[bytes]:
    d.mkdir()
    (d / "vmstate").write_bytes(rng.randbytes(64))
    oracle = [rng.randbytes(PAGE) if p % 5 else bytes(PAGE) for p in range(NPAGES)]
    with open(d / "memory", "wb") as f:
        f.truncate(NPAGES * PAGE)
        for p, data in enumerate(oracle):
            if any(data):
                f.seek(p * PAGE)
                f.write(data)
    return oracle


@pytest.mark.parametrize("depth", [1, 12])
def test_an_opened_chain_reads_like_a_walk_of_its_layers(
        tmp_path: Path, depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(depth)
    oracle = _base(tmp_path / "l0", rng)
    for i in range(1, depth + 1):
        _layer(tmp_path / f"l{i - 1}", tmp_path / f"l{i}", rng, oracle)
    want = b"".join(oracle)

    def no_bitmaps(self: LayerDoc) -> None:
        raise AssertionError(f"opening decoded the page bitmap of {self.path}")

    monkeypatch.setattr(LayerDoc, "changed_pages", no_bitmaps)
    with ChainSource(str(tmp_path / f"l{depth}")) as src:
        assert src.mapped and src.chain.depth == depth
        buf = bytearray(NPAGES * PAGE)
        src.read_into(0, memoryview(buf))
        assert bytes(buf) == want
        zeros = {o // PAGE + k for o, n in src.zero_extents(0, NPAGES * PAGE)
                 for k in range(n // PAGE)}
        assert zeros == {p for p in range(NPAGES) if not any(oracle[p])}
    reader = ChainReader(resolve_chain(str(tmp_path / f"l{depth}")))
    try:
        buf = bytearray(NPAGES * PAGE - 2 * PAGE)
        reader.read_into(PAGE, memoryview(buf))  # pread across runs of every owner
        assert bytes(buf) == want[PAGE: -PAGE]
    finally:
        reader.close()


def test_a_parent_layer_file_swapped_for_another_valid_one_is_refused(tmp_path: Path) -> None:
    """Two diffs on one base (siblings), a third on the first: give the first the
    sibling's layer file (a valid file with the same parent) and the third refuses."""
    rng = random.Random(9)
    oracle = _base(tmp_path / "base", rng)
    _layer(tmp_path / "base", tmp_path / "a", rng, list(oracle))
    _layer(tmp_path / "base", tmp_path / "sibling", rng, list(oracle))
    _layer(tmp_path / "a", tmp_path / "b", rng, list(oracle))
    shutil.copy(tmp_path / "sibling" / LAYER_FILE, tmp_path / "a" / LAYER_FILE)
    resolve_chain(str(tmp_path / "a"))  # on its own, a's (new) layer file is consistent
    with pytest.raises(IntegrityError, match=f"its parent's layer file {tmp_path / 'a'}/"
                                             f"{LAYER_FILE} is not the one it was taken on"):
        resolve_chain(str(tmp_path / "b"))
