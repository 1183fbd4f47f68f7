"""``pagein store push | pull | ls | rm | gc``: snapshots in a chunk store (see docs/store.md)."""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime

from pagein.cli._console import print_table, progress_view
from pagein.cli._format import parse_size
from pagein.errors import SourceError
from pagein.snapshot.store import ops
from pagein.snapshot.store.backend import Backend
from pagein.snapshot.store.layout import StoreOptions, open_backend


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _backend(args: argparse.Namespace, create: bool = False) -> Backend:
    url = args.store or os.environ.get("PAGEIN_STORE")
    if not url:
        raise SourceError("no store given: pass --store s3://bucket[/prefix] or dir:///path "
                          "(or set PAGEIN_STORE)")
    try:  # checked before anything is created: s3:/bucket must not become ./s3:/bucket
        return open_backend(url, StoreOptions(endpoint_url=args.endpoint_url,
                                              profile=args.profile), create=create)
    except SourceError as e:
        raise SourceError(f"{'--store' if args.store else 'PAGEIN_STORE'}: {e}") from e


def _push(args: argparse.Namespace) -> int:
    progress = progress_view(args.quiet)
    backend = _backend(args, create=True)
    started = time.monotonic()
    try:
        s = ops.push(backend, args.file, args.name, chunk_size=args.chunk_size,
                     workers=args.workers, working_set=args.working_set, progress=progress)
    finally:
        progress.close()
        backend.close()
    elapsed = time.monotonic() - started
    rows = [
        ["chunks", f"{s.chunks} x {args.chunk_size // 1024} KiB"],
        ["zero (not stored)", str(s.zero_chunks)],
        ["unique", str(s.unique_chunks)],
        ["new (uploaded)", str(s.new_chunks)],
        ["bytes in", _mib(s.bytes_in)],
        ["bytes out", _mib(s.bytes_out)],
        ["compression ratio", f"{s.compression_ratio:.2f}x"],
        ["dedup savings", f"{s.dedup_savings:.1%}"],
        ["overall in/out", f"{s.bytes_in / s.bytes_out:.1f}x" if s.bytes_out else "all reused"],
        ["time", f"{elapsed:.1f} s ({s.bytes_in / (1 << 20) / max(elapsed, 1e-9):.0f} MiB/s)"],
    ]
    if s.reuploaded:
        rows.append(["restored after gc", str(s.reuploaded)])
    if s.layers:
        rows.append(["chain", f"{s.layers} layers, pushed flattened"])
    if args.working_set:
        rows.append(["working set", f"{args.working_set} (checked against {args.file})"])
    print(f"pushed {s.name} to {backend.url}")
    print_table(["", "value"], rows)
    return 0


def _push_working_set(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        n = ops.push_working_set(backend, args.name, args.working_set)
    finally:
        backend.close()
    print(f"stored working set {args.working_set} ({_mib(n)}) with {args.name} in "
          f"{backend.url}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    progress = progress_view(args.quiet)
    backend = _backend(args)
    started = time.monotonic()
    try:
        s = ops.pull(backend, args.name, args.out, workers=args.workers, progress=progress)
    finally:
        progress.close()
        backend.close()
    elapsed = time.monotonic() - started
    print(f"pulled {s.name} to {args.out}: {s.chunks} chunks ({s.zero_chunks} zero), "
          f"{_mib(s.bytes_out)} in {elapsed:.1f} s, every chunk verified")
    return 0


def _ls(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        rows = ops.list_snapshots(backend)
    finally:
        backend.close()
    print_table(["name", "size", "chunk", "chunks", "zero", "stored", "working set",
                 "created (UTC)"], [
        [r.name, _mib(r.size_bytes), f"{r.chunk_size // 1024}K", str(r.chunks),
         str(r.zero_chunks), _mib(r.stored_bytes), "yes" if r.working_set else "-",
         datetime.fromtimestamp(r.created_unix, UTC).strftime("%Y-%m-%d %H:%M:%S")]
        for r in rows])
    return 0


def _rm(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        ops.remove(backend, args.name)
    finally:
        backend.close()
    print(f"removed {args.name} and its working set, if any (its chunks go at the next "
          "'pagein store gc')")
    return 0


def _gc(args: argparse.Namespace) -> int:
    progress = progress_view(args.quiet)
    backend = _backend(args)
    try:
        s = ops.gc(backend, grace_seconds=args.grace, dry_run=args.dry_run, progress=progress)
    finally:
        progress.close()
        backend.close()
    verb = "would delete" if args.dry_run else "deleted"
    print(f"gc: {s.chunks_seen} chunks, {verb} {s.chunks_deleted} ({_mib(s.bytes_freed)}), "
          f"kept {s.kept_young} unreferenced but younger than --grace or a running push")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pagein store`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URL",
                        help="where the snapshots live: s3://bucket[/prefix], dir:///path or a "
                             "plain directory path (default $PAGEIN_STORE)")
    common.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint, e.g. http://127.0.0.1:8333 for a local SeaweedFS or "
                             "MinIO (default $AWS_ENDPOINT_URL, else AWS)")
    common.add_argument("--profile", help="AWS profile for credentials (default $AWS_PROFILE, "
                                          "else $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p = subparsers.add_parser(
        "store", help="push, pull, list, remove and gc snapshots in a chunk store (directory "
                      "or S3)",
        description="Keep raw memory snapshots as zstd-compressed, content-addressed chunks in\n"
                    "a directory or S3-compatible object storage: identical chunks of any two\n"
                    "snapshots are stored once, all-zero chunks not at all. `pagein serve\n"
                    "--source s3://bucket/NAME` restores straight from the store (docs/store.md).",
        epilog="examples:\n"
               "  pagein store push snapshot.mem vm1 --store dir:///srv/pagein\n"
               "  pagein store ls --store dir:///srv/pagein\n"
               "  pagein store pull vm1 copy.mem --store dir:///srv/pagein\n"
               "  AWS_ENDPOINT_URL=http://127.0.0.1:8333 pagein store ls --store s3://snapshots",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    push = sub.add_parser(
        "push", parents=[common], help="store a memory file as NAME",
        description="Split FILE into fixed-size chunks, upload the ones the store lacks, then\n"
                    "write the manifest NAME; print compression and dedup figures.",
        epilog="example:\n  pagein store push /snap/a/memory vm1 --store dir:///srv/pagein "
               "--chunk-size 256K", formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("file", help="raw memory file (Firecracker layout, e.g. the `memory` "
                                   "file of a `pagein vm snapshot` directory), or a diff "
                                   "layer's directory (`vm snapshot --diff`): its chain is "
                                   "pushed flattened, only chunks the store lacks uploaded")
    push.add_argument("name", help="snapshot name: 1-128 of A-Z a-z 0-9 . _ -")
    push.add_argument("--chunk-size", type=parse_size, default=1 << 20, metavar="SIZE",
                      help="chunk size, a power of two from 64K to 4M (a bare number is bytes; "
                           "default 1M)")
    push.add_argument("--workers", type=int, default=4, help="parallel uploads (default 4)")
    push.add_argument("--working-set", metavar="WS",
                      help="also store this working set (from `pagein serve --record WS`), "
                           "checked against FILE first; `pagein serve --source URL/NAME "
                           "--strategy working-set` then uses it")
    push.set_defaults(handler=_push)

    pws = sub.add_parser(
        "push-working-set", parents=[common], help="store a working set with snapshot NAME",
        description="Check working-set file WS against the stored snapshot NAME (memory size,\n"
                    "sampled pages) and store it next to its manifest, replacing any earlier\n"
                    "one. Re-pushing NAME without --working-set deletes it.",
        epilog="example:\n  pagein store push-working-set vm1 vm1.ws --store dir:///srv/pagein",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pws.add_argument("name", help="snapshot name, as `pagein store ls` shows it")
    pws.add_argument("working_set", metavar="WS",
                     help="working-set file written by `pagein serve --record WS`")
    pws.set_defaults(handler=_push_working_set)

    pull = sub.add_parser(
        "pull", parents=[common], help="rebuild NAME as a memory file",
        description="Download and verify every chunk of snapshot NAME and write it as a raw "
                    "memory file (all-zero chunks become holes).",
        epilog="example: pagein store pull vm1 copy.mem --store dir:///srv/pagein")
    pull.add_argument("name", help="snapshot name, as `pagein store ls` shows it")
    pull.add_argument("out", help="output file (written sparse, replaced atomically)")
    pull.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    pull.set_defaults(handler=_pull)

    ls = sub.add_parser("ls", parents=[common], help="list snapshots",
                        description="List the snapshots in the store: size, chunk size, "
                                    "chunk counts and the compressed bytes stored.")
    ls.set_defaults(handler=_ls)

    rm = sub.add_parser("rm", parents=[common], help="remove snapshot NAME (chunks: see gc)",
                        description="Remove snapshot NAME's manifest and working set. Its "
                                    "chunks stay until `pagein store gc` finds no snapshot "
                                    "uses them.")
    rm.add_argument("name", help="snapshot name, as `pagein store ls` shows it")
    rm.set_defaults(handler=_rm)

    gc = sub.add_parser("gc", parents=[common],
                        help="delete chunks no snapshot references (safe during pushes)",
                        description="Delete chunks that no snapshot references and that are "
                                    "older than --grace; chunks of pushes still running are "
                                    "kept.",
                        epilog="example: pagein store gc --store dir:///srv/pagein --dry-run")
    gc.add_argument("--grace", type=float, default=ops.DEFAULT_GRACE_SECONDS,
                    metavar="SECONDS",
                    help="keep unreferenced chunks younger than this many seconds "
                         f"(default {ops.DEFAULT_GRACE_SECONDS:.0f}, one hour)")
    gc.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    gc.set_defaults(handler=_gc)
