"""Snapshot store benchmark: compression, dedup, restore throughput, first-read latency.

Run: ``.venv/bin/python benchmarks/store_bench.py [--size-mib 64] [--chunk-size 256K]``
(``--no-guest`` without /dev/kvm, ``--skip-s3`` without SeaweedFS)

Synthetic data is shaped like guest memory (4 KiB pages): 40% never-touched
(zero) memory at the end; the used 60% in runs of 1-64 pages of one kind: zero (20%),
copies from a pool of "code" pages shared by every image (30%), text-like
compressible pages (30%), random pages (20%). Scenarios:

1. two snapshots of one image with 10% of its used pages changed (scattered, or in runs of
   32 pages), per chunk size: compression ratio and dedup savings of the second push;
2. ten images derived from one base (10% clustered changes each): store bytes vs
   the raw images and vs storing each snapshot alone;
3. real guests (the ``function`` workload on pagein's KVM VMM, when /dev/kvm works):
   two snapshots of one guest (at ready, then after 200 requests), and ten guests
   from one image (same boot then their own requests; or their own data);
4. through a real SeaweedFS on loopback, on the real guest's snapshot (else the
   synthetic one): whole-snapshot restore throughput from the store (cold cache,
   warm disk cache, hot memory cache) against reading the raw local file, and
   first-read latency (p50/p99) of a 4 KiB read in a chunk not yet in the memory
   cache, cold vs warm disk cache vs hot.

Every ratio is against a baseline measured in the same run. The process is pinned to
the same CPUs for every measurement (os.sched_setaffinity).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pagein.cli._format import parse_size, table
from pagein.snapshot.store import ops
from pagein.snapshot.store.backend import LocalBackend
from pagein.snapshot.store.cache import ChunkCache
from pagein.snapshot.store.layout import StoreOptions, open_backend, read_manifest
from pagein.snapshot.store.source import ChunkedSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "s3"))

PAGE = 4096
WORDS = [b"the", b"of", b"and", b"to", b"in", b"is", b"for", b"on", b"that", b"with", b"page",
         b"memory", b"kernel", b"struct", b"task", b"file", b"inode", b"buffer", b"cache",
         b"lock", b"list", b"node", b"value"]


def synth_image(size: int, seed: int, code_pool: list[bytes]) -> bytearray:
    """Guest-memory-like bytes: a used part with mixed pages, then never-touched memory.

    The first 60% is in use, in runs of 1-64 pages of one kind (zero, shared code,
    text, random); the rest stays zero, like guest RAM the guest never touched.
    """
    rnd = random.Random(seed)
    out = bytearray(size)
    used = int(size * 0.6) // PAGE
    page = 0
    while page < used:
        run = min(rnd.randint(1, 64), used - page)
        r = rnd.random()
        for p in range(page, page + run):
            off = p * PAGE
            if r < 0.20:
                continue
            if r < 0.50:
                out[off:off + PAGE] = rnd.choice(code_pool)
            elif r < 0.80:
                text = b" ".join(rnd.choice(WORDS) for _ in range(PAGE // 4))
                out[off:off + PAGE] = text[:PAGE]
            else:
                out[off:off + PAGE] = rnd.randbytes(PAGE)
        page += run
    return out


def mutate(image: bytearray, fraction: float, run_pages: int, seed: int) -> bytearray:
    """Change ``fraction`` of the used pages, in runs of ``run_pages`` consecutive pages."""
    rnd = random.Random(seed)
    out = bytearray(image)
    pages = int(len(image) * 0.6) // PAGE
    changed = 0
    while changed < fraction * pages:
        start = rnd.randrange(0, pages - run_pages + 1)
        for p in range(start, start + run_pages):
            out[p * PAGE:p * PAGE + PAGE] = rnd.randbytes(PAGE // 2) + bytes(PAGE // 2)
        changed += run_pages
    return out


def store_bytes(backend: LocalBackend) -> int:
    return sum(o.size_bytes for o in backend.list("chunks/"))


def guest_memory(m: object) -> bytes:
    """The guest's RAM as Firecracker's raw memory file lays it out (regions in order)."""
    regions = m.memory.regions  # type: ignore[attr-defined]
    return b"".join(r.mapping.read(0, r.size) for r in regions)


def state_mib(mem_mib: int) -> int:
    """The function guest's state: half its RAM, a quarter below 64 MiB (layout overhead)."""
    return mem_mib // 2 if mem_mib >= 64 else max(1, mem_mib // 4)


def real_guest_snapshots(tmp: Path, mem_mib: int, requests: int) -> tuple[Path, Path] | None:
    """Boot the ``function`` guest; snapshot it at ready and again after ``requests``.

    Returns the two raw memory files, or None when this machine cannot run the VMM.
    """
    try:
        from pagein.vmm.image import workload_image
        from pagein.vmm.machine import Machine
        from pagein.vmm.workloads import function_args
    except ImportError:
        return None
    if not os.path.exists("/dev/kvm"):
        return None
    wa = function_args(state_mib(mem_mib) << 20, seed=1)
    with Machine.create(mem_mib << 20, 1) as m:
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(60):
            raise RuntimeError("the function guest never signalled ready")
        m.pause()
        (tmp / "guest-1").write_bytes(guest_memory(m))
        m.resume()
        for i in range(requests):
            m.console.send(f"sum {i * 997} {i * 997 + 20000}\n")
            m.console.read_line(timeout=60)
        m.pause()
        (tmp / "guest-2").write_bytes(guest_memory(m))
        m.resume()
        m.console.send("quit\n")
        m.wait(timeout=60)
    return tmp / "guest-1", tmp / "guest-2"


def boot_and_snapshot(path: Path, mem_mib: int, seed: int, requests: int) -> None:
    """Boot one ``function`` guest, serve ``requests`` requests, write its memory to path."""
    from pagein.vmm.image import workload_image
    from pagein.vmm.machine import Machine
    from pagein.vmm.workloads import function_args

    wa = function_args(state_mib(mem_mib) << 20, seed=seed)
    with Machine.create(mem_mib << 20, 1) as m:
        m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
        m.start()
        if not m.ready.wait(60):
            raise RuntimeError("the function guest never signalled ready")
        for i in range(requests):
            m.console.send(f"sum {i * 991} {i * 991 + 5000}\n")
            m.console.read_line(timeout=60)
        m.pause()
        path.write_bytes(guest_memory(m))
        m.resume()
        m.console.send("quit\n")
        m.wait(timeout=60)


def ten_real_guests(tmp: Path, mem_mib: int, cs: int) -> None:
    """Ten ``function`` guests from one image: same boot then own requests; or own data."""
    rows = []
    for label, seeds, requests in [
            ("same boot, 10-100 own requests", [1] * 10, [10 * (i + 1) for i in range(10)]),
            ("own data (seeds 1-10)", list(range(1, 11)), [0] * 10)]:
        backend = LocalBackend(tmp / "ten-guests", create=True)
        alone = 0
        for i, (seed, n) in enumerate(zip(seeds, requests, strict=True)):
            boot_and_snapshot(tmp / "g", mem_mib, seed, n)
            alone += ops.push(backend, tmp / "g", f"g{i}", chunk_size=cs).unique_stored_bytes
        total = store_bytes(backend)
        raw = 10 * (mem_mib << 20)
        rows.append([label, f"{alone / (1 << 20):.1f}", f"{total / (1 << 20):.1f}",
                     f"{1 - total / alone:.1%}", f"{raw / total:.1f}x"])
        shutil.rmtree(tmp / "ten-guests")
    print(f"\n== ten real guests from one image (function workload, {mem_mib} MiB RAM, "
          f"{state_mib(mem_mib)} MiB state; {cs >> 10}K chunks; raw {10 * mem_mib} MiB)")
    print(table(["guests", "alone MiB", "shared MiB", "dedup savings", "raw/stored"], rows))


def push_pair(tmp: Path, a: Path, b: Path, label: str, cs: int) -> list[str]:
    backend = LocalBackend(tmp / "pair", create=True)
    first = ops.push(backend, a, "a", chunk_size=cs)
    second = ops.push(backend, b, "b", chunk_size=cs)
    raw = a.stat().st_size + b.stat().st_size
    row = [f"{label}, {cs >> 10}K", f"{first.compression_ratio:.2f}x",
           f"{first.zero_chunks / first.chunks:.0%}", f"{second.new_chunks}/{second.chunks}",
           f"{second.dedup_savings:.2%}", f"{raw / store_bytes(backend):.1f}x"]
    shutil.rmtree(tmp / "pair")
    return row


PAIR_HEADERS = ["change pattern, chunk", "compression", "zero chunks", "new chunks 2nd",
                "dedup 2nd push", "raw/stored (both)"]


def bench_two_snapshots(tmp: Path, base: bytearray, chunk_sizes: list[int]) -> None:
    rows = []
    (tmp / "a").write_bytes(base)
    for run in (1, 32):
        (tmp / "b").write_bytes(mutate(base, 0.10, run, seed=99))
        label = "scattered pages" if run == 1 else "runs of 32 pages"
        rows += [push_pair(tmp, tmp / "a", tmp / "b", label, cs) for cs in chunk_sizes]
    print("\n== two snapshots of one image, 10% of used pages changed "
          f"({len(base) >> 20} MiB each)")
    print(table(PAIR_HEADERS, rows))


def bench_ten_images(tmp: Path, size: int, pool: list[bytes], cs: int) -> None:
    base = synth_image(size, 1, pool)
    backend = LocalBackend(tmp / "ten", create=True)
    alone = 0
    for i in range(10):
        (tmp / "img").write_bytes(mutate(base, 0.10, 32, seed=200 + i))
        s = ops.push(backend, tmp / "img", f"vm{i}", chunk_size=cs)
        alone += s.unique_stored_bytes
    total = store_bytes(backend)
    raw = 10 * size
    print(f"\n== ten images from one base ({size >> 20} MiB each, {cs >> 10}K chunks, "
          "10% pages changed in runs of 32)")
    print(table(["measure", "value"], [
        ["raw bytes (10 images)", f"{raw / (1 << 20):.0f} MiB"],
        ["stored, each snapshot alone", f"{alone / (1 << 20):.1f} MiB"],
        ["stored, shared store", f"{total / (1 << 20):.1f} MiB"],
        ["dedup savings across images", f"{1 - total / alone:.1%}"],
        ["raw / stored", f"{raw / total:.1f}x"],
    ]))
    shutil.rmtree(tmp / "ten")


def read_all(source: ChunkedSource, slice_bytes: int = 8 << 20) -> float:
    """Read the whole snapshot in slices, hinting the next slice first (readahead)."""
    buf = bytearray(slice_bytes)
    started = time.perf_counter()
    for off in range(0, source.size, slice_bytes):
        n = min(slice_bytes, source.size - off)
        source.prefetch(off + slice_bytes, slice_bytes)
        source.read_into(off, memoryview(buf)[:n])
    return time.perf_counter() - started


def read_raw(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(8 << 20)
        started = time.perf_counter()
        for off in range(0, size, len(buf)):
            os.preadv(fd, [memoryview(buf)[:min(len(buf), size - off)]], off)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def first_reads(source: ChunkedSource, offsets: list[int]) -> list[float]:
    buf = memoryview(bytearray(PAGE))
    out = []
    for off in offsets:
        t = time.perf_counter()
        source.read_into(off, buf)
        out.append(time.perf_counter() - t)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e3


def bench_seaweedfs(tmp: Path, image: bytearray, cs: int, kind: str) -> None:
    from seaweed_server import BUCKET, start_weed

    os.environ.update({"AWS_ACCESS_KEY_ID": "pagein-test-key",
                       "AWS_SECRET_ACCESS_KEY": "pagein-test-secret",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/x"})
    server = start_weed(tmp / "weed")
    try:
        (tmp / "mem").write_bytes(image)
        backend = open_backend(f"s3://{BUCKET}/bench", StoreOptions(endpoint_url=server.endpoint))
        t = time.perf_counter()
        ops.push(backend, tmp / "mem", "vm", chunk_size=cs, workers=4)
        push_s = time.perf_counter() - t
        manifest = read_manifest(backend, "vm")
        mib = len(image) / (1 << 20)
        raw_s = min(read_raw(tmp / "mem") for _ in range(3))

        def source(cache_dir: Path) -> ChunkedSource:
            return ChunkedSource(backend, manifest, ChunkCache(cache_dir), owns_backend=False)

        rows = [["raw local file (page cache)", f"{mib / raw_s:.0f}", "1.00"]]
        with source(tmp / "cache-t") as cold:
            cold_s = read_all(cold)
            hot_s = read_all(cold)
        with source(tmp / "cache-t") as warm:
            warm_s = read_all(warm)
        for label, secs in [("store, cold cache (SeaweedFS)", cold_s),
                            ("store, warm disk cache", warm_s),
                            ("store, hot memory cache", hot_s)]:
            rows.append([label, f"{mib / secs:.0f}", f"{raw_s / secs:.3f}"])
        print(f"\n== restore throughput, whole {kind} snapshot in 8 MiB reads with readahead "
              f"({mib:.0f} MiB, {cs >> 10}K chunks; push took {push_s:.1f} s = "
              f"{mib / push_s:.0f} MiB/s)")
        print(table(["source", "MiB/s", "vs raw"], rows))

        rnd = random.Random(5)
        nonzero = [i for i, c in enumerate(manifest.chunks) if c is not None]
        picks = rnd.sample(nonzero, min(200, len(nonzero)))
        offsets = [i * cs + rnd.randrange(cs // PAGE) * PAGE for i in picks]
        with source(tmp / "cache-l") as cold:
            cold_lat = first_reads(cold, offsets)
            hot_lat = first_reads(cold, offsets)
        with source(tmp / "cache-l") as warm:
            warm_lat = first_reads(warm, offsets)
        base = statistics.median(cold_lat)
        lat_rows = [[label, f"{pct(v, 0.5):.3f}", f"{pct(v, 0.99):.3f}",
                     f"{base / statistics.median(v):.1f}x"]
                    for label, v in [("cold: fetch from SeaweedFS", cold_lat),
                                     ("warm disk cache", warm_lat),
                                     ("hot memory cache", hot_lat)]]
        print(f"\n== first read of a 4 KiB page in a new chunk, {kind} snapshot "
              f"({len(offsets)} chunks, {cs >> 10}K)")
        print(table(["cache state", "p50 ms", "p99 ms", "p50 speedup vs cold"], lat_rows))
        backend.close()
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=64, help="image size (default 64)")
    p.add_argument("--chunk-size", type=parse_size, default=256 << 10,
                   help="chunk size for the ten-image and SeaweedFS runs (default 256K)")
    p.add_argument("--skip-s3", action="store_true", help="no SeaweedFS part")
    p.add_argument("--no-guest", action="store_true",
                   help="no real-guest part (it needs /dev/kvm and gcc)")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)  # same CPUs for every measurement below
    print(f"pinned to CPUs {cpus}; image {args.size_mib} MiB")
    size = args.size_mib << 20
    rnd = random.Random(0)
    pool = [rnd.randbytes(PAGE // 2) * 2 for _ in range(512)]
    base = synth_image(size, 0, pool)
    tmp = Path(tempfile.mkdtemp(prefix="pagein-store-bench-"))
    try:
        sizes = [64 << 10, 256 << 10, 1 << 20]
        bench_two_snapshots(tmp, base, sizes)
        bench_ten_images(tmp, max(size // 2, 1 << 20), pool, args.chunk_size)
        guests = None if args.no_guest else real_guest_snapshots(tmp, args.size_mib, 200)
        if guests is not None:
            print(f"\n== two snapshots of one real guest ({args.size_mib} MiB RAM, function "
                  "workload): at ready, then after 200 requests")
            print(table(PAIR_HEADERS, [push_pair(tmp, *guests, "guest", cs) for cs in sizes]))
            ten_real_guests(tmp, args.size_mib, args.chunk_size)
        if not args.skip_s3:
            image = bytearray(guests[0].read_bytes()) if guests is not None else base
            bench_seaweedfs(tmp, image, args.chunk_size,
                            "real guest" if guests is not None else "synthetic")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
