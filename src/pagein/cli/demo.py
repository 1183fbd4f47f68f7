"""``pagein demo``: snapshot a KVM guest, restore it every way, check its answers, compare.

``--memory-only`` runs the earlier demo that needs no KVM: a memory snapshot restored
eagerly and lazily, every byte verified.
"""

from __future__ import annotations

import argparse
import sys

from pagein.cli._console import print_table
from pagein.cli._format import parse_size
from pagein.demo import CloneRun, check_demo_size, run_demo, run_vm_demo
from pagein.errors import PageinError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="snapshot a KVM guest, restore it by copy, file and uffd, compare",
        description="Boot the built-in `function` guest on /dev/kvm, snapshot it when it is\n"
                    "ready, restore the snapshot 6 ways (copy, MAP_PRIVATE file mapping, and\n"
                    "lazily through pagein's userfaultfd handler with 4 strategies: the\n"
                    "on-demand restore records the working set the last one prefetches),\n"
                    "check every restored guest answers as the original did and print what\n"
                    "each restore cost; then restore 3 clones at once, privately and with\n"
                    "--share-pages, and show the host memory each way (about 20 s).\n"
                    "--memory-only: restore a plain memory snapshot eagerly\n"
                    "and lazily instead (no KVM needed). Sizes take a unit: K, M or G.",
        epilog="examples:\n"
               "  pagein demo\n"
               "  pagein demo --state 512M --mem 1G --vcpus 1\n"
               "  pagein demo --memory-only --size 1G",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=parse_size, default="128M", metavar="SIZE",
                   help="the guest's records (default 128M); its hash table adds 1/8 to 1/4")
    p.add_argument("--mem", type=parse_size, default="256M", metavar="SIZE",
                   help="guest RAM, a multiple of 2M; at least 16M + --state + its hash table "
                        "(160M for 128M of state; the error says the exact figure; default "
                        "256M)")
    p.add_argument("--vcpus", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--memory-only", action="store_true",
                   help="the memory-only demo: no KVM guest, every byte verified")
    p.add_argument("--size", type=parse_size, default="256M", metavar="SIZE",
                   help="--memory-only snapshot size, a multiple of 4K, e.g. 64M or 1G "
                        "(default 256M)")
    p.set_defaults(handler=_run)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _run(args: argparse.Namespace) -> int:
    if args.memory_only:
        return _run_memory(args)
    print(f"booting the function guest ({args.state >> 20} MiB of state, {args.mem >> 20} MiB "
          f"RAM, {args.vcpus} vCPUs), snapshotting it at READY, restoring it 6 ways...",
          flush=True)
    try:
        r = run_vm_demo(args.state, args.mem, args.vcpus)
    except ValueError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 2
    except PageinError as e:
        print(f"pagein: error: {e}", file=sys.stderr)
        return 1
    print(f"original: ready after {_ms(r.ready_s)}, snapshot (pause + save) "
          f"{_ms(r.snapshot_s)}; requests after the snapshot: {r.requests[0]!r} (a few "
          f"pages), {r.requests[1]!r} (all state)\n")
    rows = [[x.method, _ms(x.resume_s), _ms(x.first_answer_s), _ms(x.all_state_s),
             f"{x.present_bytes / (1 << 20):,.0f} MiB", "yes" if x.answers_match else "NO"]
            for x in r.runs]
    print_table(["restore", "resume", "first answer", "all-state answer", "memory present",
                 "answers = original"], rows)
    ok = all(x.answers_match for x in r.runs) and all(c.answers_match for c in r.clones)
    print("\nTimes are from the start of the restore. uffd restores hand memory to a pagein "
          "serve\nalready listening (a fleet's daemon); its start is not counted. Memory "
          "present:\nguest pages mapped in the VMM after both answers (/proc/self/pagemap).\n"
          "The on-demand restore records the pages the guest touched; working-set "
          "prefetches\nthem, in the order the guest first touched them, while the guest runs.")
    if r.clones:
        _print_clones(r.clones)
    if not ok:
        print("pagein: error: a restored guest answered differently from the original",
              file=sys.stderr)
    return 0 if ok else 1


def _print_clones(clones: tuple[CloneRun, ...]) -> None:
    one = clones[0].host_bytes / clones[0].clones  # one private clone
    print(f"\nClones sharing memory: {clones[0].clones} clones alive at once, each having "
          "answered the checksum\n(all its state), restored through one pagein serve:\n")
    print_table(["clones", "host memory", "x one clone", "answers = original"],
                [[c.method, f"{c.host_bytes / (1 << 20):,.0f} MiB",
                  f"{c.host_bytes / one:.2f}x", "yes" if c.answers_match else "NO"]
                 for c in clones])
    print("\nHost memory: Pss of every mapping of the clones' guest RAM and of the "
          "server's page\ncache, a shared page counted once. --share-pages maps each "
          "clone's memory copy-on-write\nfrom one cache of the snapshot: its clean pages "
          "are one physical page for all clones.")


def _run_memory(args: argparse.Namespace) -> int:
    try:
        check_demo_size(args.size)
    except ValueError as e:
        print(f"pagein: error: {e}: pass --size with a unit, e.g. --size 64M", file=sys.stderr)
        return 2
    print(f"writing a {args.size >> 20} MiB snapshot with known content, then restoring it "
          "4 ways...", flush=True)
    result = run_demo(args.size)
    print("every byte verified after each restore\n")
    rows = [[r.method, _ms(r.ready_s), _ms(r.first_byte_s), _ms(r.tenth_s), _ms(r.total_s),
             f"{r.faults:,}"] for r in result.runs]
    print_table(["restore", "usable after", "first byte", "random 10% read", "all pages read",
                 "faults served"], rows)
    eager, lazy = result.runs[0], result.runs[1:]
    best = min(lazy, key=lambda r: r.tenth_s)
    print(f"\nEager: the memory is usable after {_ms(eager.ready_s)}, when all of it is copied."
          f"\nLazy: usable at once; the first byte took {_ms(lazy[0].first_byte_s)}, a random "
          f"10% of the pages {_ms(best.tenth_s)} ({best.method}).\n"
          "Each first touch costs a fault round trip; readahead and background population "
          "amortise it.\n(Lazy times exclude starting the handler process, which is a "
          "long-running daemon in a fleet.)")
    return 0
