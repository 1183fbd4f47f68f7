"""``pagein vm``: run a guest workload on KVM, build the guest images."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from pagein.vmm.console import Console
from pagein.vmm.image import build_all, workload_image
from pagein.vmm.machine import Machine, RunResult
from pagein.vmm.memory import Backing
from pagein.vmm.workloads import parse_size, parse_workload


def register(subparsers: Any) -> None:
    vm = subparsers.add_parser("vm", help="run guest workloads on a small KVM VMM",
                               description="A small KVM VMM: guests run at CPL 3 and talk "
                                           "to the VMM by port I/O (see docs/vmm.md).")
    sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    vm.set_defaults(handler=lambda args: (vm.print_help(), 2)[1])

    run = sub.add_parser("run", help="boot a workload and forward its console",
                         description="Boot a workload; stdin lines become its requests, its "
                                     "console goes to stdout; exit with the guest's status.")
    run.add_argument("--mem", default="512M", help="guest RAM, e.g. 512M or 2G (default 512M)")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--workload", default="function", choices=("function", "scan", "hello"))
    run.add_argument("--backing", default="anonymous", choices=[b.value for b in Backing],
                     help="guest memory: private anonymous, shared memfd, or 2 MiB hugetlb")
    run.add_argument("--stats", action="store_true",
                     help="print run time and VM exit counts to stderr at the end")
    run.add_argument("--timeout", type=float, default=None,
                     help="stop the guest after this many seconds (exit 124)")
    run.add_argument("args", nargs="*", metavar="KEY=VALUE",
                     help="workload arguments: function state=256M seed=1; scan "
                          "pattern=seq|random|stride|hotset op=read|write size= touches= "
                          "stride= hot= seed=; hello status=")
    run.set_defaults(handler=run_command)

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
    # A daemon thread: reading stdin blocks, and the VM must not wait for it to end.
    for line in sys.stdin.buffer:
        console.send(line)
    console.close_input()


def run_command(args: argparse.Namespace) -> int:
    try:
        mem = parse_size(args.mem)
        workload = parse_workload(args.workload, args.args)
    except ValueError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    console = Console(sink=_stdout_sink)
    image = workload_image(workload.name)
    try:
        machine = Machine.create(mem, args.vcpus, backing=Backing(args.backing),
                                 console=console)
    except ValueError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    with machine:
        try:
            machine.boot(image, workload.args, min_heap_bytes=workload.min_heap_bytes)
        except ValueError as e:
            print(f"pagein: error: {e}", file=sys.stderr)
            return 2
        machine.start()
        threading.Thread(target=_pump_stdin, args=(console,), name="pagein-stdin",
                         daemon=True).start()
        try:
            result = machine.wait(args.timeout)
        except TimeoutError as e:
            print(f"pagein: {e}", file=sys.stderr)
            return 124
        except KeyboardInterrupt:
            machine.stop()
            return 130
        if args.stats:
            _print_stats(result)
    return result.status if result.status < 256 else 255


def _print_stats(result: RunResult) -> None:
    total = sum(result.exits.values())
    ready = "never" if result.ready_seconds is None else f"{result.ready_seconds:.3f} s"
    print(f"[pagein] status {result.status}, ran {result.run_seconds:.3f} s, ready after "
          f"{ready}, {total} VM exits", file=sys.stderr)
    for kind, count in sorted(result.exits.items(), key=lambda kv: -kv[1]):
        print(f"[pagein]   {kind:<20} {count}", file=sys.stderr)
