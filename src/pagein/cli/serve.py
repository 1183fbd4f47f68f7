"""``pagein serve``: a Firecracker-compatible page-fault handler."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
from collections.abc import Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from pagein.errors import PageinError, Unavailable
from pagein.serve.server import BadHandshakePolicy, Server, ServerConfig
from pagein.serve.session import DEFAULT_CHUNK_BYTES
from pagein.serve.stats import write_json
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, make_strategy
from pagein.snapshot.open import open_source

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
                   help="recorded working set for --strategy working-set")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="largest fill of background work (default 1M)")
    p.add_argument("--on-bad-handshake", choices=[b.value for b in BadHandshakePolicy],
                   default=BadHandshakePolicy.KILL.value,
                   help="kill the VMM (default) or only close its connection")
    p.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write counters here on exit and on SIGUSR1")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus text metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--exit-after", type=int, metavar="N",
                   help="exit once N VMs have been served and have gone")
    p.set_defaults(handler=run)


def _load_working_set(path: str | None) -> Sequence[tuple[int, int]] | None:
    if path is None:
        return None
    try:
        module = importlib.import_module("pagein.snapshot.workingset")
    except ImportError as e:
        raise Unavailable("this pagein has no working-set file support yet "
                          "(pagein.snapshot.workingset): use another --strategy") from e
    extents: Sequence[tuple[int, int]] = module.load_extents(path)
    return extents


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
    ws = _load_working_set(args.working_set)
    if args.strategy == StrategyName.WORKING_SET.value and ws is None:
        raise PageinError("--strategy working-set needs --working-set FILE")
    # Build one strategy now so a bad --readahead-size fails before listening.
    make_strategy(args.strategy, readahead_bytes=args.readahead_size, working_set=ws)
    source = open_source(args.mem_file or args.source)
    try:
        config = ServerConfig(args.socket, BadHandshakePolicy(args.on_bad_handshake),
                              args.handshake_timeout, args.chunk_size, args.exit_after)
        server = Server(config, source, partial(make_strategy, args.strategy,
                                                readahead_bytes=args.readahead_size,
                                                working_set=ws))
        return _serve(server, args)
    finally:
        source.close()


def _serve(server: Server, args: argparse.Namespace) -> int:
    def dump(_sig: int = 0, _frame: FrameType | None = None) -> None:
        if args.stats_json:
            write_json(args.stats_json, server.stats_doc())

    def stop(_sig: int, _frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
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
