"""``pagein vm``: run a guest workload on KVM, snapshot it, restore it, build the images."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from pagein.cli import _ids
from pagein.cli._format import command_group
from pagein.errors import PageinError
from pagein.serve.options import strategy_flag_errors
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, Then
from pagein.vmm.console import Console
from pagein.vmm.control import ControlServer, request
from pagein.vmm.image import build_all, workload_image
from pagein.vmm.layout import MAX_VCPUS
from pagein.vmm.machine import Machine, RunResult
from pagein.vmm.memory import Backing
from pagein.vmm.restore import Backend, RestoredVm, RestoreOptions, restore
from pagein.vmm.snapshot import save_snapshot
from pagein.vmm.workloads import parse_size, parse_workload


def register(subparsers: Any) -> None:
    sub = command_group(
        subparsers, "vm", help="run guest workloads on a small KVM VMM",
        description="A small KVM VMM (needs /dev/kvm): freestanding C guests run at CPL 3 and\n"
                    "talk to the VMM by port I/O; snapshot them and restore them by copy, file\n"
                    "mapping or userfaultfd (docs/vmm.md, docs/restore.md).",
        epilog="examples:\n"
               "  printf 'key 5\\nchecksum\\n' | pagein vm run --mem 512M state=256M --stats\n"
               "  pagein vm run --mem 304M --snapshot-at-ready /tmp/snap state=256M </dev/null\n"
               "  echo checksum | pagein vm restore /tmp/snap --backend uffd --stats")

    run = sub.add_parser(
        "run", help="boot a workload and forward its console",
        description="Boot a workload; stdin lines become its requests, its console goes to\n"
                    "stdout; exit with the guest's status. The function workload answers\n"
                    "`key I`, `get K`, `sum A B`, `checksum`, `info` and `quit` (docs/vmm.md).",
        epilog="examples:\n"
               "  printf 'key 5\\nchecksum\\nquit\\n' | pagein vm run --mem 512M --vcpus 2 "
               "state=256M --stats\n"
               "  pagein vm run --workload scan pattern=random size=64M touches=100000 "
               "</dev/null\n"
               "  pagein vm run --mem 64M --workload hello status=3 </dev/null; echo $?\n"
               "  pagein vm run --mem 48M --hugepages --snapshot-at-ready /tmp/hsnap "
               "state=8M </dev/null",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--mem", default="512M", metavar="SIZE",
                     help="guest RAM with a unit, a multiple of 2M, e.g. 512M or 2G (default "
                          "512M); function state=256M needs at least 304M")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--workload", default="function", choices=("function", "scan", "hello"),
                     help="the guest program (default function); its arguments are KEY=VALUE")
    run.add_argument("--hugepages", action="store_true",
                     help="back guest RAM with 2 MiB hugetlbfs pages (fewer TLB misses); "
                          "needs --mem / 2M free pages in the pool (sysctl vm.nr_hugepages), "
                          "checked at start; its snapshots restore into 2 MiB pages too")
    run.add_argument("--backing", default=None, choices=[b.value for b in Backing],
                     help="guest memory: private anonymous (default), a shared memfd, or "
                          "hugetlb (the same as --hugepages)")
    run.add_argument("--stats", action="store_true",
                     help="print run time and VM exit counts to stderr at the end")
    run.add_argument("--timeout", type=float, default=None,
                     help="stop the guest after this many seconds (exit 124)")
    run.add_argument("--control", metavar="PATH",
                     help="listen for control requests (pagein vm snapshot) on this socket")
    run.add_argument("--snapshot-at-ready", metavar="DIR",
                     help="snapshot into DIR when the guest says READY, then go on")
    run.add_argument("args", nargs="*", metavar="KEY=VALUE",
                     help="workload arguments: function state=256M seed=1; scan "
                          "pattern=seq|random|stride|hotset op=read|write size= touches= "
                          "stride= hot= seed=; hello status=")
    run.set_defaults(handler=run_command)

    _register_snapshot(sub)
    _register_restore(sub)

    build = sub.add_parser("build-guest", help="build and cache the guest workloads with gcc")
    build.add_argument("--cc", default="gcc", help="C compiler (default gcc)")
    build.set_defaults(handler=build_command)


def build_command(args: argparse.Namespace) -> int:
    try:
        paths = build_all(cc=args.cc)
    except RuntimeError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _stdout_sink(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _pump_stdin(console: Console) -> None:
    # A daemon thread: reading stdin blocks, and the VM must not wait for it to end. It
    # reads the fd directly: a daemon thread blocked inside sys.stdin's buffered reader
    # holds its lock, and Python aborts at exit when it finds that lock taken.
    while data := os.read(sys.stdin.fileno(), 65536):
        console.send(data)
    console.close_input()


def run_command(args: argparse.Namespace) -> int:
    try:
        mem = parse_size(args.mem)
        workload = parse_workload(args.workload, args.args)
    except ValueError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.vcpus <= MAX_VCPUS:
        print(f"pagein: error: --vcpus {args.vcpus} must be between 1 and {MAX_VCPUS}",
              file=sys.stderr)
        return 2
    if args.hugepages and args.backing not in (None, Backing.HUGETLB.value):
        print(f"pagein: error: --hugepages is --backing hugetlb, not --backing "
              f"{args.backing}: drop one of them", file=sys.stderr)
        return 2
    backing = Backing.HUGETLB if args.hugepages else Backing(args.backing or "anonymous")
    console = Console(sink=_stdout_sink)
    image = workload_image(workload.name)
    try:
        machine = Machine.create(mem, args.vcpus, backing=backing,
                                 console=console)
    except ValueError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    with machine:
        if args.control or args.snapshot_at_ready is not None:
            # Snapshots may be taken: log every write, so a later one can be a --diff.
            machine.enable_dirty_tracking()
        try:
            machine.boot(image, workload.args, min_heap_bytes=workload.min_heap_bytes)
        except ValueError as e:
            print(f"pagein: error: {e}", file=sys.stderr)
            return 2
        machine.pause_on_ready = args.snapshot_at_ready is not None
        machine.start()
        tag = (workload.name, workload.args)
        try:
            if args.snapshot_at_ready is not None:
                _snapshot_at_ready(machine, args.snapshot_at_ready, tag)
            with contextlib.ExitStack() as stack:
                if args.control:
                    stack.enter_context(ControlServer(machine, args.control, workload=tag))
                return _drive(machine, console, args)
        except PageinError as e:
            machine.stop()
            print(f"pagein: error: {e}", file=sys.stderr)
            return 1


def _snapshot_at_ready(machine: Machine, directory: str,
                       workload: tuple[str, tuple[int, ...]]) -> None:
    # No stdin is forwarded before the snapshot: input queued then would be replayed by
    # every restore of it.
    while not machine.ready.wait(0.2):
        if not machine.active_vcpus:
            raise PageinError("the guest ended before it said READY: no snapshot was taken")
    machine.pause()
    snap = save_snapshot(machine, directory, workload=workload)
    machine.resume()
    print(f"[pagein] snapshot at READY: {directory} ({snap.memory_bytes >> 20} MiB memory)",
          file=sys.stderr)


def _await_guest(console: Console, wait: Callable[[float | None], RunResult],
                 stop: Callable[[], None], timeout: float | None) -> RunResult | int:
    """Forward stdin to the guest and wait for its end; an exit code on timeout or ^C."""
    threading.Thread(target=_pump_stdin, args=(console,), name="pagein-stdin",
                     daemon=True).start()
    try:
        return wait(timeout)
    except TimeoutError as e:
        print(f"pagein: {e}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        stop()
        return 130


def _drive(machine: Machine, console: Console, args: argparse.Namespace) -> int:
    """Forward stdin, wait for the guest's end, print stats; return the exit status."""
    result = _await_guest(console, machine.wait, machine.stop, args.timeout)
    if isinstance(result, int):
        return result
    if args.stats:
        _print_stats(result)
    return result.status if result.status < 256 else 255


def _register_snapshot(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="snapshot a running VM through its control socket",
                       description="Pause the VM listening on --control, write its state "
                                   "and memory into\n--out, and let it go on (see "
                                   "docs/restore.md).",
                       epilog="example:\n"
                              "  pagein vm run --mem 304M --control /tmp/vm.sock state=256M &\n"
                              "  pagein vm snapshot --control /tmp/vm.sock --out /tmp/snap",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", required=True, metavar="PATH",
                   help="the VM's control socket (pagein vm run --control PATH)")
    p.add_argument("--out", required=True, metavar="DIR", help="snapshot directory to write")
    p.add_argument("--stop", action="store_true",
                   help="leave the VM paused after the snapshot")
    p.add_argument("--diff", action="store_true",
                   help="write only the pages changed since the snapshot this VM was "
                        "restored from or last snapshotted to, as a layer on it (restore "
                        "resolves the chain; see docs/restore.md)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (dir, diff, pause_ms, bytes_written, "
                        "memory_bytes) instead of the sentence")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up waiting for the VM's answer after this long (default 300)")
    p.set_defaults(handler=snapshot_command)


def snapshot_command(args: argparse.Namespace) -> int:
    try:
        answer = request(args.control, {"op": "snapshot", "dir": os.path.abspath(args.out),
                                        "resume": not args.stop, "diff": args.diff},
                         args.timeout)
    except PageinError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        keys = ("dir", "diff", "pause_ms", "bytes_written", "memory_bytes")
        print(json.dumps({k: answer.get(k) for k in keys}))
        return 0
    kind = "diff layer" if args.diff else "snapshot"
    print(f"{kind} {answer['dir']}: {int(answer.get('bytes_written', 0)) >> 10} KiB written "
          f"of {int(answer['memory_bytes']) >> 20} MiB memory, guest paused "
          f"{float(answer['pause_ms']):.1f} ms")
    return 0


def _register_restore(sub: Any) -> None:
    p = sub.add_parser("restore", help="restore a VM snapshot: copy, file mapping or uffd",
                       description="Restore a snapshot directory and resume the guest; stdin "
                                   "lines become\nits requests, its console goes to stdout. A "
                                   "snapshot of a `vm run --hugepages` guest\nrestores into 2 MiB "
                                   "pages (copy, uffd; file maps 4 KiB page-cache pages): the\n"
                                   "vm.nr_hugepages pool is checked at start (uffd: one spare "
                                   "page), see docs/restore.md.",
                       epilog="example:\n  echo checksum | pagein vm restore /tmp/snap "
                              "--backend uffd --strategy readahead --stats",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="DIR", help="a directory written by pagein vm snapshot")
    p.add_argument("--backend", choices=[b.value for b in Backend], default="uffd",
                   help="copy: read memory first; file: map it MAP_PRIVATE; uffd: fill it "
                        "lazily through pagein serve (default)")
    p.add_argument("--strategy", choices=[s.value for s in StrategyName], default=None,
                   help="how --backend uffd fills memory (default on-demand; see docs/serve.md)")
    p.add_argument("--readahead-size", default=None, metavar="SIZE",
                   help="readahead window for --strategy readahead, with a unit, e.g. 1M "
                        f"(default {DEFAULT_READAHEAD_BYTES >> 10}K)")
    p.add_argument("--uffd-socket", metavar="PATH",
                   help="hand the uffd to this running pagein serve --socket (default: "
                        "spawn one for this VM)")
    p.add_argument("--trust-uid", type=_ids.uid_list, action="append", metavar="UIDS",
                   help="--uffd-socket may be served by these users too (names or uids, "
                        "comma list, repeatable); the handler gets write access to guest "
                        "memory, so by default only root or your own user may serve it")
    p.add_argument("--no-identity-check", action="store_true",
                   help="--uffd-socket: do not ask the handler to confirm it serves this "
                        "snapshot (its size and SHA-256); for a handler other than pagein "
                        "serve, which would not answer")
    p.add_argument("--working-set", metavar="FILE",
                   help="recorded working set for --strategy working-set or reap (default: "
                        "DIR/working-set when it exists)")
    p.add_argument("--record", metavar="FILE",
                   help="--backend uffd: write the pages this VM faults on as a working-set "
                        "file when it stops (e.g. DIR/working-set)")
    p.add_argument("--shared-memory", action="store_true",
                   help="guest memory in a memfd another process can map (copy or uffd; "
                        "with uffd such a peer maps it through the VM's handler, "
                        "pagein.vmm.peer.map_guest_memory, or it may read zeros: "
                        "docs/restore.md)")
    p.add_argument("--share-pages", action="store_true",
                   help="--backend uffd: map guest memory copy-on-write from pagein serve's "
                        "page cache of the snapshot, so every VM restored through one "
                        "--uffd-socket shares the pages it did not write (each page is "
                        "read from the source once for all of them)")
    p.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=None,
                   help="--backend uffd: let the handler map each 2 MiB of guest memory "
                        "with one huge page once every 4 KiB page of it is filled (default: "
                        "the handler's; off for the one it spawns); --no-collapse keeps 4 KiB "
                        "pages (it marks guest memory MADV_NOHUGEPAGE, which the kernel "
                        "enforces for any handler)")
    p.add_argument("--verify-memory", action="store_true",
                   help="check the memory file's SHA-256 before resuming (reads it all)")
    p.add_argument("--control", metavar="PATH", help="listen for control requests here")
    p.add_argument("--stats", action="store_true",
                   help="print resume latency, run time and pages present to stderr")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the guest after this many seconds (exit 124)")
    p.set_defaults(handler=restore_command)


def _working_set_arg(args: argparse.Namespace) -> str | None:
    """The working set for working-set/reap: --working-set, else DIR/working-set if present."""
    if args.working_set is not None:
        return str(args.working_set)
    default = os.path.join(args.snapshot, "working-set")
    needs = args.strategy in (StrategyName.WORKING_SET.value, StrategyName.REAP.value)
    if needs and os.path.exists(default):
        return default
    return None


def _collapse_flag(args: argparse.Namespace) -> str:
    return "--no-collapse" if args.collapse is False else "--collapse"


def _flag_errors(args: argparse.Namespace) -> list[str]:
    """Flags that would be ignored with this backend or strategy, each named."""
    if args.backend != Backend.UFFD.value:
        given = [flag for flag, value in (("--strategy", args.strategy),
                                          ("--readahead-size", args.readahead_size),
                                          ("--uffd-socket", args.uffd_socket),
                                          ("--working-set", args.working_set),
                                          ("--record", args.record),
                                          (_collapse_flag(args), args.collapse))
                 if value is not None]
        return [f"{flag} only applies to --backend uffd (not --backend {args.backend}): "
                f"drop it or use --backend uffd" for flag in given]
    return strategy_flag_errors(StrategyName(args.strategy or StrategyName.ON_DEMAND.value),
                                Then.READAHEAD, readahead_given=args.readahead_size is not None,
                                then_given=False, record_given=args.record is not None)


def restore_command(args: argparse.Namespace) -> int:
    if errors := _flag_errors(args):
        print(f"pagein: error: {errors[0]}", file=sys.stderr)
        return 2
    if args.strategy is None:
        args.strategy = StrategyName.ON_DEMAND.value
    readahead = args.readahead_size or str(DEFAULT_READAHEAD_BYTES)
    try:
        opts = RestoreOptions(Backend(args.backend), StrategyName(args.strategy),
                              parse_size(readahead), args.uffd_socket,
                              args.shared_memory, args.verify_memory,
                              working_set=_working_set_arg(args), record=args.record,
                              trust_uids=tuple(i for ids in args.trust_uid or () for i in ids),
                              track_dirty=args.control is not None,
                              check_identity=not args.no_identity_check,
                              share_pages=args.share_pages,
                              collapse=args.collapse)
        console = Console(sink=_stdout_sink)
        vm = restore(args.snapshot, opts, console=console)
    except (ValueError, PageinError, OSError) as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    with vm:
        try:
            with contextlib.ExitStack() as stack:
                if args.control:
                    stack.enter_context(ControlServer(vm.machine, args.control,
                                                      workload=vm.snapshot.workload))
                status = _drive_restored(vm, console, args)
        except PageinError as e:
            print(f"pagein: error: {e}", file=sys.stderr)
            return 1
    return status


def _drive_restored(vm: RestoredVm, console: Console, args: argparse.Namespace) -> int:
    result = _await_guest(console, vm.wait, vm.machine.stop, args.timeout)
    if isinstance(result, int):
        return result
    if args.stats:
        print(f"[pagein] restored with {vm.options.backend.value} in "
              f"{vm.resume_seconds * 1e3:.1f} ms, {vm.pages_present()} guest pages present",
              file=sys.stderr)
        ram = sum(m.length for m in vm.mappings)
        huge = vm.huge_bytes()
        print(f"[pagein] huge pages: {huge >> 20} MiB of {ram >> 20} MiB guest RAM "
              f"({100 * huge / max(ram, 1):.0f}%, AnonHugePages)", file=sys.stderr)
        _print_stats(result, restored=True)
    return result.status if result.status < 256 else 255


def _print_stats(result: RunResult, *, restored: bool = False) -> None:
    total = sum(result.exits.values())
    if result.ready_seconds is not None:
        ready = f", ready after {result.ready_seconds:.3f} s"
    else:
        # A restored guest was snapshotted after READY: it never signals it again.
        ready = "" if restored else ", never ready"
    print(f"[pagein] status {result.status}, ran {result.run_seconds:.3f} s{ready}, "
          f"{total} VM exits", file=sys.stderr)
    for kind, count in sorted(result.exits.items(), key=lambda kv: -kv[1]):
        print(f"[pagein]   {kind:<20} {count}", file=sys.stderr)
