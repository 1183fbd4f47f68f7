"""``pagein serve``: a Firecracker-compatible page-fault handler."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from pagein.cli import _ids
from pagein.serve.engine import EngineName
from pagein.serve.options import (
    DEFAULT_CHUNK_BYTES,
    BadHandshakePolicy,
    ServeOptions,
    VmFailurePolicy,
)
from pagein.serve.served import open_served
from pagein.serve.server import Server
from pagein.serve.stats import write_json
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, Then

log = logging.getLogger("pagein.serve")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Parse ``4096``, ``256K``, ``2M`` or ``1G`` (binary units) into bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 256K or 2M") from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve guest memory page faults (Firecracker's UFFD handler protocol)",
        description="Listen on a Unix socket and serve the page faults of every VMM that "
                    "connects (Firecracker: mem_backend {backend_type: Uffd, backend_path: "
                    "SOCKET}) from a snapshot memory file or store.")
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mem-file", metavar="FILE", help="the raw snapshot memory file")
    src.add_argument("--source", metavar="URL",
                     help="a snapshot source: a path, file://, s3://bucket/name or dir://")
    p.add_argument("--strategy", choices=[s.value for s in StrategyName],
                   default=StrategyName.ON_DEMAND.value, help="restore strategy")
    p.add_argument("--readahead-size", type=parse_size, default=DEFAULT_READAHEAD_BYTES,
                   metavar="SIZE", help="readahead window (power of two; default 256K)")
    p.add_argument("--working-set", metavar="FILE",
                   help="recorded working set for --strategy working-set or reap")
    p.add_argument("--then", choices=[t.value for t in Then], default=Then.READAHEAD.value,
                   help="working-set: how the pages not recorded arrive (default readahead; "
                        "populate-all also fills the rest in the background)")
    p.add_argument("--record", metavar="FILE",
                   help="when the VM goes, write the pages it faulted on as a working-set "
                        "file (and the trace to FILE.trace.json unless --trace is given); "
                        "with several VMs the first to go writes FILE, later ones FILE.2, ...")
    p.add_argument("--trace", metavar="FILE",
                   help="when the VM goes, write its fault trace (for pagein report)")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="largest fill of background work (default 1M)")
    p.add_argument("--on-bad-handshake", choices=[b.value for b in BadHandshakePolicy],
                   default=BadHandshakePolicy.KILL.value,
                   help="kill the VMM (default) or only close its connection")
    p.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time a VMM has to complete its handshake (default 5)")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write counters here on exit and on SIGUSR1")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus text metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--engine", choices=[e.value for e in EngineName],
                   default=EngineName.default().value,
                   help="fault engine: native (C, the default) or python (the reference "
                        "implementation; used automatically when the native one is not "
                        "built, said once at start; PAGEIN_ENGINE=python changes the "
                        "default)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="serving worker processes (default: one per CPU); VMs are spread "
                        "over them and served in parallel; 0 serves in this process")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="worker crashes a VM survives (a new worker takes it over, the guest "
                        "notices nothing) before its session fails (default 3)")
    p.add_argument("--on-vm-failure", choices=[v.value for v in VmFailurePolicy],
                   default=VmFailurePolicy.KILL.value,
                   help="when a VM's session fails for good: kill its VMM (default) or "
                        "leave it frozen")
    p.add_argument("--page-cache-keep", type=float, default=60.0, metavar="SECONDS",
                   help="VMMs restored with --share-pages map their memory from one page "
                        "cache of the snapshot that this server keeps; keep it this long "
                        "after the last such VM goes, so the next clone starts warm "
                        "(default 60)")
    access = p.add_argument_group(
        "who may connect",
        "The server copies snapshot memory into whatever VMM connects: by default only "
        "root and this server's own user can connect (socket mode 0600) and be served. "
        "Both checks must pass; see the Security section of docs/serve.md.")
    access.add_argument("--socket-mode", type=_ids.octal_mode, metavar="MODE",
                        help="permissions of the socket file, octal (default 0600, or 0660 "
                             "with --socket-group); whatever the umask")
    access.add_argument("--socket-group", type=_ids.gid, metavar="GROUP",
                        help="group (name or gid) of the socket file, e.g. the gid a jailed "
                             "Firecracker runs as; peers connecting with that gid are also "
                             "served")
    access.add_argument("--allow-uid", type=_ids.uid_list, action="append", metavar="UIDS",
                        help="also serve peers running as these users (names or uids, comma "
                             "list, repeatable); root and this server's user always are")
    access.add_argument("--allow-gid", type=_ids.gid_list, action="append", metavar="GIDS",
                        help="also serve peers whose (effective) gid is one of these (names "
                             "or gids, comma list, repeatable)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--exit-after", type=int, metavar="N",
                   help="exit once N VMs have been served and have gone")
    p.set_defaults(handler=run)


class _Metrics(BaseHTTPRequestHandler):
    def __init__(self, server_obj: Server, *args: Any) -> None:
        self.pagein = server_obj
        super().__init__(*args)

    def do_GET(self) -> None:
        if self.path not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.pagein.prometheus().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


def run(args: argparse.Namespace) -> int:
    options = ServeOptions.from_namespace(args)
    served = open_served(options, warm=True)
    try:
        server = Server(served)
        return _serve(server, args)
    finally:
        served.close()


def _serve(server: Server, args: argparse.Namespace) -> int:
    def dump(_sig: int = 0, _frame: FrameType | None = None) -> None:
        if args.stats_json:
            write_json(args.stats_json, server.stats_doc())

    def stop(_sig: int, _frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
    server.wake_on_signals()
    httpd = None
    if args.metrics_port is not None:
        httpd = ThreadingHTTPServer(("127.0.0.1", args.metrics_port), partial(_Metrics, server))
        threading.Thread(target=httpd.serve_forever, daemon=True, name="pagein-metrics").start()
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        server.serve_forever()
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        dump()
    return 0
