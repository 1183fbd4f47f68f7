"""``pagein serve``: a Firecracker-compatible page-fault handler."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from pagein.cli import _ids
from pagein.errors import ConfigError, PageinError, SnapshotFormatError, SourceError
from pagein.serve.engine import EngineName
from pagein.serve.options import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_DRAIN_S,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_METRICS_KEEP_ENDED_S,
    BadHandshakePolicy,
    ServeOptions,
    VmFailurePolicy,
)
from pagein.serve.served import Served, open_served
from pagein.serve.server import Server
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, Then
from pagein.snapshot.store.cache import DEFAULT_DISK_BYTES
from pagein.snapshot.urls import split_location
from pagein.sys.systemd import inherited_listener
from pagein.vmm.snapshot import MEMORY_FILE, STATE_FILE, load_snapshot

if TYPE_CHECKING:
    from pagein.serve.config import Fleet
    from pagein.serve.fleet import FleetServer
    from pagein.serve.metrics import MetricsEndpoint

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


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0, e.g. 300")
    return value


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535 (argparse type)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port from 0 to 65535 "
                                         "(0 picks a free one), e.g. 9464")
    return int(text)


def _number(kind: type[int] | type[float], low: float, what: str) -> Any:
    """An argparse type: a ``kind`` number of at least ``low`` (the message says ``what``)."""
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low or value != value:  # NaN compares false
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return convert


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size above 0, e.g. 1M")
    return size


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve guest memory page faults (Firecracker's UFFD handler protocol)",
        description="Listen on a Unix socket and serve the page faults of every VMM that "
                    "connects (Firecracker: mem_backend {backend_type: Uffd, backend_path: "
                    "SOCKET}) from a snapshot memory file or store.",
        epilog="signals: SIGTERM drains (stops accepting, waits --drain-timeout for the "
               "attached VMs, each filling its missing pages), a second SIGTERM or SIGINT "
               "stops at once, SIGHUP logs the state and writes --stats-json (with --config: "
               "reads the file again, serving added snapshots and draining removed ones), "
               "SIGUSR1 writes --stats-json. Under systemd: "
               "sd_notify (Type=notify) and socket activation are supported; see "
               "docs/serve.md, Running as a service.")
    p.add_argument("--socket", metavar="PATH",
                   help="Unix socket to listen on (one snapshot; with several, see --config)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mem-file", metavar="FILE", help="the raw snapshot memory file")
    src.add_argument("--source", metavar="URL",
                     help="a snapshot source: a path, file://, s3://bucket/name or dir://")
    fleet = p.add_argument_group(
        "many snapshots, one daemon",
        "Serve several snapshots, each on its own socket, from one process (one metrics "
        "endpoint and one stats file for all; every series labelled snapshot). The other "
        "flags are every snapshot's defaults. See docs/serve.md, One daemon, many snapshots.")
    fleet.add_argument("--config", metavar="FILE",
                       help="a TOML file listing the snapshots ([snapshots.NAME] tables "
                            "with source = ..., optional socket = ... and per-snapshot "
                            "flags); SIGHUP reads it again: added snapshots are served, "
                            "removed ones drained, without a restart")
    fleet.add_argument("--snapshot", action="append", metavar="NAME=SOURCE",
                       help="serve SOURCE (a path or URL as --source takes) on "
                            "--socket-dir/NAME.sock; repeatable")
    fleet.add_argument("--socket-dir", metavar="DIR",
                       help="where the snapshots' sockets go: DIR/NAME.sock (unless an entry "
                            "of --config sets socket)")
    store = p.add_argument_group(
        "store settings",
        "For s3:// and dir:// sources (each overrides the environment variable named).")
    store.add_argument("--endpoint-url", metavar="URL",
                       help="S3 endpoint, e.g. http://127.0.0.1:8333 (default "
                            "$AWS_ENDPOINT_URL, else AWS)")
    store.add_argument("--profile", metavar="NAME",
                       help="AWS profile for credentials (default $AWS_PROFILE, else "
                            "$AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or the instance role)")
    store.add_argument("--cache-dir", metavar="DIR",
                       help="the host's chunk cache directory, shared by every snapshot and "
                            "process (default $PAGEIN_CACHE_DIR, else /var/cache/pagein/chunks "
                            "as root, ~/.cache/pagein/chunks otherwise)")
    store.add_argument("--cache-size", type=_positive_size, metavar="SIZE",
                       help="the most the chunk cache directory holds; the oldest chunks are "
                            f"deleted past it (default {DEFAULT_DISK_BYTES >> 30}G)")
    p.add_argument("--strategy", choices=[s.value for s in StrategyName],
                   default=StrategyName.ON_DEMAND.value, help="restore strategy")
    p.add_argument("--readahead-size", type=parse_size, default=None, metavar="SIZE",
                   help="readahead window for --strategy readahead or working-set (power of "
                        f"two; default {DEFAULT_READAHEAD_BYTES >> 10}K)")
    p.add_argument("--working-set", metavar="FILE",
                   help="recorded working set for --strategy working-set or reap")
    p.add_argument("--then", choices=[t.value for t in Then], default=None,
                   help="--strategy working-set only: how the pages not recorded arrive "
                        "(default readahead; populate-all also fills the rest in the "
                        "background)")
    p.add_argument("--record", metavar="FILE",
                   help="when the VM goes, write the pages it faulted on as a working-set "
                        "file (and the trace to FILE.trace.json unless --trace is given); "
                        "with several VMs the first to go writes FILE, later ones FILE.2, ...; "
                        "with --strategy on-demand only (others fill pages the guest never "
                        "asked for)")
    p.add_argument("--trace", metavar="FILE",
                   help="when the VM goes, write its fault trace (for pagein report)")
    p.add_argument("--chunk-size", type=_positive_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="largest fill of background work (default 1M)")
    p.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=False,
                   help="once every 4 KiB page of a 2 MiB-aligned range of a VM is filled "
                        "(by readahead, populate-all, a working-set prefetch or faults), ask "
                        "the kernel to map it with one 2 MiB page, as memory that never left "
                        "RAM may be; a VMM can refuse by marking its guest memory "
                        "MADV_NOHUGEPAGE (default: off, 4 KiB pages: on a kvm_pvm host "
                        "restored guests were measured slower on huge pages, see "
                        "docs/serve.md)")
    p.add_argument("--on-bad-handshake", choices=[b.value for b in BadHandshakePolicy],
                   default=BadHandshakePolicy.KILL.value,
                   help="kill the VMM (default) or only close its connection")
    p.add_argument("--handshake-timeout", type=_number(float, 0.001, "a positive number of "
                                                            "seconds"),
                   default=5.0, metavar="SECONDS",
                   help="time a VMM has to complete its handshake (default 5); a peer that "
                        "sends nothing in that time is closed, never killed")
    p.add_argument("--drain-timeout", type=_number(float, 0, "a number of seconds >= 0"),
                   default=DEFAULT_DRAIN_S, metavar="SECONDS",
                   help="on SIGTERM: stop accepting, then give the connected VMs this long "
                        f"to finish (default {DEFAULT_DRAIN_S:g}; 0: stop at once); a "
                        "second SIGTERM or SIGINT stops at once")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write counters here on exit and on SIGUSR1 (if it cannot be "
                        "written: one log line, serving goes on; exit status 1 at the end)")
    metrics = p.add_argument_group(
        "metrics", "Prometheus metrics of every VM and of the server (the list is in the "
        "Observability section of docs/serve.md).")
    metrics.add_argument("--metrics-port", type=_port, metavar="PORT",
                         help="serve Prometheus metrics at http://ADDRESS:PORT/metrics "
                              "(0 picks a free port); off unless given")
    metrics.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS,
                         metavar="ADDRESS",
                         help="the address --metrics-port listens on (default 127.0.0.1, "
                              "this machine only; 0.0.0.0 or :: lets other machines scrape)")
    metrics.add_argument("--metrics-keep-ended", type=_seconds,
                         default=DEFAULT_METRICS_KEEP_ENDED_S, metavar="SECONDS",
                         help="how long the series of a VM that has gone stay on /metrics "
                              "(default 300); the server's totals keep counting it")
    p.add_argument("--engine", choices=[e.value for e in EngineName],
                   default=EngineName.default().value,
                   help="fault engine: native (C, the default) or python (the reference "
                        "implementation; used automatically when the native one is not "
                        "built, said once at start; PAGEIN_ENGINE=python changes the "
                        "default)")
    p.add_argument("--workers", type=_number(int, 0, "a number of workers >= 0"), default=None,
                   metavar="N",
                   help="serving worker processes (default: one per CPU); VMs are spread "
                        "over them and served in parallel; 0 serves in this process")
    p.add_argument("--max-restarts", type=_number(int, 0, "a count >= 0"), default=3,
                   metavar="N",
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
    p.add_argument("--exit-after", type=_number(int, 1, "a number of VMs >= 1"), metavar="N",
                   help="exit once N VMs have been served and have gone")
    p.set_defaults(handler=run)


def _recorded_sha256(path: str) -> str | None:
    """The SHA-256 the snapshot's state file records for memory file ``path``, when
    ``path`` is the memory file of a pagein snapshot directory: identity checks then
    compare digests without hashing the file (see docs/serve.md)."""
    directory, name = os.path.split(os.path.abspath(path))
    if name != MEMORY_FILE or not os.path.exists(os.path.join(directory, STATE_FILE)):
        return None
    try:
        return load_snapshot(directory).memory_sha256
    except PageinError as e:
        log.warning("not using the SHA-256 recorded in %s: %s", directory, e)
        return None


def _open(options: ServeOptions, args: argparse.Namespace) -> Served:
    """Open what --mem-file or --source names; an error about it names that flag."""
    flag = "--mem-file" if args.mem_file is not None else "--source"
    try:
        if args.mem_file is not None:  # a path or file:// (a URL is for --source)
            split_location(args.mem_file, ("file",), what="memory file")
        return open_served(options, warm=True)
    except (SourceError, SnapshotFormatError) as e:
        if str(e).startswith("--"):  # already names its flag (--working-set, --strategy)
            raise
        hint = " (a store snapshot is served with --source URL)" if \
            args.mem_file is not None and "://" in args.mem_file else ""
        raise type(e)(f"{flag}: {e}{hint}") from e


def run(args: argparse.Namespace) -> int:
    if args.config is not None or args.snapshot:
        return _run_fleet(args)
    if args.socket_dir is not None:
        raise ConfigError("--socket-dir is for several snapshots: add --config FILE or "
                          "--snapshot NAME=SOURCE (one snapshot takes --socket PATH)")
    if args.socket is None or (args.mem_file is None and args.source is None):
        raise ConfigError("give --socket PATH and --mem-file FILE or --source URL (one "
                          "snapshot), or --config FILE or --snapshot NAME=SOURCE with "
                          "--socket-dir DIR (several)")
    options = ServeOptions.from_namespace(args)
    if args.mem_file is not None:
        options = options.with_(memory_sha256=_recorded_sha256(args.mem_file))
    listener = inherited_listener()  # systemd socket activation (LISTEN_FDS)
    endpoint = None
    try:
        _check_start(options, listener)
        if options.metrics_port is not None:
            # Bound first: a bad --metrics-address fails before a VMM can connect.
            from pagein.serve.metrics import MetricsEndpoint  # only a server that serves them
            endpoint = MetricsEndpoint(options.metrics_address, options.metrics_port)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    try:
        served = _open(options, args)
        try:
            server = Server(served, listener=listener)
            return _serve(server, args, endpoint)
        finally:
            served.close()
    finally:
        if endpoint is not None:
            endpoint.close()


def _run_fleet(args: argparse.Namespace) -> int:
    """Serve every snapshot ``--config`` or ``--snapshot`` names (pagein.serve.fleet)."""
    from pagein.serve.config import load_config, parse_snapshot_flags
    from pagein.serve.fleet import FleetServer  # only a daemon of several snapshots

    for flag, value in (("--socket", args.socket), ("--mem-file", args.mem_file),
                        ("--source", args.source), ("--exit-after", args.exit_after),
                        ("--record", args.record), ("--trace", args.trace),
                        ("--working-set", args.working_set)):
        if value is not None:
            raise ConfigError(f"{flag} is one snapshot's: with --config or --snapshot, set it "
                              "per snapshot in the config file (the socket: socket = ... or "
                              "--socket-dir)")
    if args.config is not None and args.snapshot:
        raise ConfigError("--snapshot with --config: list every snapshot in the config file")
    if os.environ.get("LISTEN_FDS") is not None:
        raise ConfigError("socket activation (LISTEN_FDS) passes one socket: run one "
                          "pagein@.service per snapshot, or let pagein bind --socket-dir")

    def load() -> Fleet:
        if args.config is not None:
            return load_config(args.config, args, args.socket_dir)
        return parse_snapshot_flags(args.snapshot, args, args.socket_dir)

    fleet = _named(load())
    if args.stats_json is not None:
        _check_writable(args.stats_json)
    endpoint = None
    if args.metrics_port is not None:
        from pagein.serve.metrics import MetricsEndpoint
        endpoint = MetricsEndpoint(args.metrics_address, args.metrics_port)
    try:
        server = FleetServer(fleet, (lambda: _named(load())) if args.config else None,
                             args.stats_json)
        return _serve_fleet(server, args, endpoint)
    finally:
        if endpoint is not None:
            endpoint.close()


def _named(fleet: Fleet) -> Fleet:
    """Each snapshot's options carry its name (log lines and metrics say which)."""
    from pagein.serve.config import Fleet
    return Fleet({n: o.with_(snapshot=n) for n, o in fleet.snapshots.items()}, fleet.origin)


def _serve_fleet(server: FleetServer, args: argparse.Namespace,
                 endpoint: MetricsEndpoint | None) -> int:
    def asker(what: str) -> Callable[[int, FrameType | None], None]:
        return lambda _sig, _frame: server.request(what)  # sets a flag: the loop acts

    for signum, what in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop-now"),
                         (signal.SIGUSR1, "stats"), (signal.SIGHUP, "reload")):
        signal.signal(signum, asker(what))
    server.wake_on_signals()
    if endpoint is not None:
        from pagein.serve.metrics import FleetCollector
        endpoint.serve(FleetCollector(server.samples))
    return _run(server, args, endpoint)


def _check_start(options: ServeOptions, listener: socket.socket | None) -> None:
    """What can be known wrong before serving: raise :class:`ConfigError` naming the flag,
    instead of a traceback later (or a file never written)."""
    if options.stats_json is not None:
        _check_writable(options.stats_json)
    if listener is not None:
        for flag, value in (("--socket-mode", options.socket_mode),
                            ("--socket-group", options.socket_group)):
            if value is not None:
                raise ConfigError(f"{flag} does not apply with socket activation: systemd "
                                  "created the socket; set SocketMode= / SocketGroup= in "
                                  "the .socket unit instead")
        bound = listener.getsockname()
        if isinstance(bound, str) and os.path.abspath(bound) != os.path.abspath(
                options.socket_path):
            raise ConfigError(f"--socket {options.socket_path} differs from the socket "
                              f"systemd passed ({bound}): make them the same path")


def _check_writable(path: str) -> None:
    """Whether ``--stats-json`` can be written: its directory exists and takes a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--stats-json {path} is a directory: give a file name")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stats-check-", dir=directory)
    except OSError as e:
        raise ConfigError(f"--stats-json {path}: cannot write in {directory}: "
                          f"{e.strerror}: create the directory or choose another") from e
    os.close(fd)
    os.unlink(probe)


def _serve(server: Server, args: argparse.Namespace, endpoint: MetricsEndpoint | None) -> int:
    # The handlers only set flags; the serve loop (woken by set_wakeup_fd) does the work,
    # so nothing raised while writing the stats can unwind it and freeze the VMs.
    def dump(_sig: int, _frame: FrameType | None) -> None:
        server.request_stats()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        server.request_stop()  # the first drains, a second stops at once

    def stop_now(_sig: int, _frame: FrameType | None) -> None:
        server.request_stop_now()

    def state(_sig: int, _frame: FrameType | None) -> None:
        server.request_state()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop_now)
    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGHUP, state)
    server.wake_on_signals()
    if endpoint is not None:
        from pagein.serve.metrics import ServerCollector
        endpoint.serve(ServerCollector(server.sampler()))
    return _run(server, args, endpoint)


def _run(server: Server | FleetServer, args: argparse.Namespace,
         endpoint: MetricsEndpoint | None) -> int:
    """Say where the metrics are, tell --ready-fd, serve until stopped, write the stats
    (a failure to write them is logged; the exit status says it)."""
    if endpoint is not None:
        host = args.metrics_address
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
                 endpoint.port)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        server.serve_forever()
    finally:
        written = server.write_stats()
    return 0 if written else 1
