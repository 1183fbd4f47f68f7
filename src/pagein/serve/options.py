"""Everything ``pagein serve`` can be told, in one value: :class:`ServeOptions`.

The CLI parses flags into it (:meth:`ServeOptions.from_namespace`); a VMM that spawns
its own handler builds one and turns it back into a command line (:meth:`to_argv`);
the supervisor hands it to its serving workers as JSON (:meth:`to_json`). This module
is the one place that knows both the fields and the flags, so no other layer builds a
``pagein serve`` command line.
"""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import asdict, dataclass, field, fields, replace

from pagein.errors import ConfigError
from pagein.serve.access import DEFAULT_SOCKET_MODE, GROUP_SOCKET_MODE, Access
from pagein.serve.engine import EngineName
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, Then

__all__ = ["BadHandshakePolicy", "ServeOptions", "VmFailurePolicy", "default_workers",
           "strategy_flag_errors", "uses_readahead_window"]

DEFAULT_CHUNK_BYTES = 1 << 20
#: Where --metrics-port listens unless told: loopback, so nothing is exposed by surprise.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: How long the series of a VM that ended stay on the metrics endpoint, in seconds.
DEFAULT_METRICS_KEEP_ENDED_S = 300.0
DEFAULT_DRAIN_S = 30.0  # SIGTERM: how long attached VMs get to finish (populate-all)
_RECORDS_WITH = (StrategyName.ON_DEMAND,)  # docs/working-set.md: record on demand only


def uses_readahead_window(strategy: StrategyName, then: Then) -> bool:
    """Whether ``--readahead-size`` changes anything with this strategy (and ``--then``)."""
    if strategy is StrategyName.READAHEAD:
        return True
    return strategy is StrategyName.WORKING_SET and then is not Then.ON_DEMAND


def strategy_flag_errors(strategy: StrategyName, then: Then, *, readahead_given: bool,
                         then_given: bool, record_given: bool) -> list[str]:
    """What is wrong with flags given alongside ``--strategy`` (empty: nothing).

    Shared by ``pagein serve`` and ``pagein vm restore``: a flag the strategy ignores is
    refused, naming it, instead of being silently dropped.
    """
    errors = []
    if then_given and strategy is not StrategyName.WORKING_SET:
        errors.append(f"--then only applies to --strategy working-set (not "
                      f"{strategy.value}): drop --then or use --strategy working-set")
    if readahead_given and not uses_readahead_window(strategy, then):
        errors.append(f"--readahead-size does nothing with --strategy {strategy.value}"
                      + (" --then on-demand" if strategy is StrategyName.WORKING_SET else "")
                      + ": drop it, or use --strategy readahead (or working-set)")
    if record_given and strategy not in _RECORDS_WITH:
        errors.append(f"--record with --strategy {strategy.value} would record pages "
                      "installed ahead of the guest, not the ones it used: record with "
                      "--strategy on-demand (docs/working-set.md)")
    return errors


class BadHandshakePolicy(enum.Enum):
    """What to do with a VMM whose handshake is invalid."""

    KILL = "kill"  # SIGKILL the peer (SO_PEERCRED): a frozen VMM helps nobody
    CLOSE = "close"  # close the connection and leave the peer alone


class VmFailurePolicy(enum.Enum):
    """What to do with a VM whose serving failed for good (its workers kept dying)."""

    KILL = "kill"  # SIGKILL the VMM through its pidfd: its guest cannot go on
    FREEZE = "freeze"  # leave it frozen on its missing pages, for someone to inspect


def default_workers() -> int:
    """One serving worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How to serve: the source, the strategy, the engine, the workers, the limits."""

    socket_path: str
    source: str  # a path, file://, s3://bucket/name or dir://
    strategy: StrategyName = StrategyName.ON_DEMAND
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES
    working_set: str | None = None
    then: Then = Then.READAHEAD
    record: str | None = None
    trace: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    on_bad_handshake: BadHandshakePolicy = BadHandshakePolicy.KILL
    handshake_timeout: float = 5.0
    stats_json: str | None = None
    metrics_port: int | None = None
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_keep_ended_s: float = DEFAULT_METRICS_KEEP_ENDED_S  # ended VMs' series stay
    exit_after: int | None = None  # stop once this many VM sessions have ended
    drain_timeout: float = DEFAULT_DRAIN_S  # SIGTERM: time attached VMs get to finish
    engine: EngineName = field(default_factory=EngineName.default)
    workers: int | None = None  # worker processes; None: one per CPU; 0: in this process
    max_restarts: int = 3  # worker crashes a VM survives before its session fails
    on_vm_failure: VmFailurePolicy = VmFailurePolicy.KILL
    socket_mode: int | None = None  # None: 0600, or 0660 with socket_group
    socket_group: int | None = None  # gid of the socket file (None: the server's own)
    allow_uids: tuple[int, ...] = ()  # served besides root and the server's own uid
    allow_gids: tuple[int, ...] = ()  # served by the gid they connect with
    #: The memory file's SHA-256 when known without hashing it (the snapshot's state
    #: file records it): identity checks then never hash the file.
    memory_sha256: str | None = None
    page_cache_keep: float = 60.0  # seconds a page cache no VM uses is kept (--share-pages)
    #: Collapse each wholly filled 2 MiB range into a huge page (pagein.serve.collapse).
    #: Off by default: measured, guests ran slower on huge pages on kvm_pvm (docs/serve.md).
    collapse: bool = False
    # How to reach an s3:// or dir:// store (None: the environment's; see docs/store.md).
    endpoint_url: str | None = None
    profile: str | None = None
    cache_dir: str | None = None  # the host's chunk cache directory
    cache_bytes: int | None = None  # its bound (None: DEFAULT_DISK_BYTES)
    snapshot: str | None = None  # its name when one daemon serves several (--config)

    def __post_init__(self) -> None:
        # A readahead size or --then the strategy does not use means nothing: keep the
        # default there, so that equal behaviour is an equal value (and to_argv, which
        # emits only the flags a strategy uses, round-trips).
        if not uses_readahead_window(self.strategy, self.then):
            object.__setattr__(self, "readahead_bytes", DEFAULT_READAHEAD_BYTES)
        if self.strategy is not StrategyName.WORKING_SET:
            object.__setattr__(self, "then", Then.READAHEAD)
        if self.socket_mode is not None and not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"--socket-mode {self.socket_mode:o} is not a permission mode "
                             "between 0 and 777 (octal), e.g. 0660")
        if not 0 <= self.metrics_keep_ended_s < float("inf"):
            raise ValueError(f"--metrics-keep-ended {self.metrics_keep_ended_s} is not a "
                             "number of seconds >= 0: give how long an ended VM's series "
                             "stay, e.g. 300")
        if not self.page_cache_keep >= 0:
            raise ValueError(f"--page-cache-keep {self.page_cache_keep} must be 0 or more "
                             "seconds")

    @property
    def socket_permissions(self) -> int:
        """The socket file's mode: --socket-mode, else 0600 (0660 with --socket-group)."""
        if self.socket_mode is not None:
            return self.socket_mode
        return DEFAULT_SOCKET_MODE if self.socket_group is None else GROUP_SOCKET_MODE

    @property
    def access(self) -> Access:
        """Who is served: root, this uid, --allow-uid, --allow-gid and --socket-group."""
        gids = (*self.allow_gids, *(() if self.socket_group is None else (self.socket_group,)))
        return Access.of(self.allow_uids, gids)

    @property
    def worker_count(self) -> int:
        """Serving worker processes to start (0: serve in this process)."""
        return default_workers() if self.workers is None else self.workers

    @property
    def strategy_label(self) -> str:
        """The strategy as a trace and a report name it: ``readahead 256 KiB``,
        ``working-set then readahead``, ``on-demand``."""
        name = self.strategy.value
        if self.strategy is StrategyName.READAHEAD:
            return f"{name} {self.readahead_bytes // 1024} KiB"
        if self.strategy in (StrategyName.WORKING_SET, StrategyName.REAP):
            return f"{name} then {self.then.value}"
        return name

    @property
    def trace_path(self) -> str | None:
        """Where a VM's trace goes: --trace, or FILE.trace.json next to --record FILE."""
        return self.trace or (f"{self.record}.trace.json" if self.record else None)

    # --- the command line -----------------------------------------------------------

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServeOptions:
        """Build from ``pagein serve``'s parsed flags.

        ``--readahead-size`` and ``--then`` default to None in the parser, so a flag the
        strategy would ignore can be told from one not given: it raises
        :class:`ConfigError` naming it (as does ``--record`` with a prefetching strategy).
        """
        strategy, then = StrategyName(args.strategy), Then(args.then or Then.READAHEAD.value)
        errors = strategy_flag_errors(strategy, then,
                                      readahead_given=args.readahead_size is not None,
                                      then_given=args.then is not None,
                                      record_given=args.record is not None)
        if errors:
            raise ConfigError(errors[0])
        readahead = DEFAULT_READAHEAD_BYTES if args.readahead_size is None else args.readahead_size
        return cls(
            socket_path=args.socket, source=args.mem_file or args.source,
            strategy=strategy, readahead_bytes=readahead,
            working_set=args.working_set, then=then, record=args.record,
            trace=args.trace, chunk_bytes=args.chunk_size,
            on_bad_handshake=BadHandshakePolicy(args.on_bad_handshake),
            handshake_timeout=args.handshake_timeout, stats_json=args.stats_json,
            metrics_port=args.metrics_port, metrics_address=args.metrics_address,
            metrics_keep_ended_s=args.metrics_keep_ended, exit_after=args.exit_after,
            engine=EngineName(args.engine), workers=args.workers,
            drain_timeout=args.drain_timeout,
            max_restarts=args.max_restarts, on_vm_failure=VmFailurePolicy(args.on_vm_failure),
            socket_mode=args.socket_mode, socket_group=args.socket_group,
            allow_uids=tuple(dict.fromkeys(i for ids in args.allow_uid or () for i in ids)),
            allow_gids=tuple(dict.fromkeys(i for ids in args.allow_gid or () for i in ids)),
            page_cache_keep=args.page_cache_keep, collapse=args.collapse,
            endpoint_url=getattr(args, "endpoint_url", None),
            profile=getattr(args, "profile", None), cache_dir=getattr(args, "cache_dir", None),
            cache_bytes=getattr(args, "cache_size", None))

    def to_argv(self) -> list[str]:
        """The ``pagein serve ...`` arguments that parse back into these options."""
        argv = ["serve", "--socket", self.socket_path, "--source", self.source,
                "--strategy", self.strategy.value, "--chunk-size", str(self.chunk_bytes),
                "--on-bad-handshake", self.on_bad_handshake.value,
                "--handshake-timeout", repr(self.handshake_timeout),
                "--drain-timeout", repr(self.drain_timeout),
                "--engine", self.engine.value, "--max-restarts", str(self.max_restarts),
                "--on-vm-failure", self.on_vm_failure.value,
                "--metrics-address", self.metrics_address,
                "--metrics-keep-ended", repr(self.metrics_keep_ended_s),
                "--page-cache-keep", repr(self.page_cache_keep),
                "--collapse" if self.collapse else "--no-collapse"]
        # Only the flags this strategy uses: the parser refuses the others.
        if uses_readahead_window(self.strategy, self.then):
            argv += ["--readahead-size", str(self.readahead_bytes)]
        if self.strategy is StrategyName.WORKING_SET:
            argv += ["--then", self.then.value]
        for flag, value in (("--working-set", self.working_set), ("--record", self.record),
                            ("--trace", self.trace), ("--stats-json", self.stats_json),
                            ("--metrics-port", self.metrics_port),
                            ("--exit-after", self.exit_after), ("--workers", self.workers),
                            ("--socket-group", self.socket_group),
                            ("--endpoint-url", self.endpoint_url), ("--profile", self.profile),
                            ("--cache-dir", self.cache_dir),
                            ("--cache-size", self.cache_bytes)):
            if value is not None:
                argv += [flag, str(value)]
        if self.socket_mode is not None:
            argv += ["--socket-mode", f"{self.socket_mode:04o}"]
        for flag, ids in (("--allow-uid", self.allow_uids), ("--allow-gid", self.allow_gids)):
            if ids:
                argv += [flag, ",".join(str(i) for i in ids)]
        return argv

    def store_options(self) -> dict[str, object]:
        """The store settings given, as :func:`~pagein.snapshot.open.open_source` takes
        them (empty: every one from the environment and the defaults). Raises
        :class:`ConfigError` naming the flag when the source is not a store: there they
        would mean nothing."""
        out: dict[str, object] = {}
        for flag, key, value in (("--endpoint-url", "endpoint_url", self.endpoint_url),
                                 ("--profile", "profile", self.profile),
                                 ("--cache-dir", "cache_dir", self.cache_dir),
                                 ("--cache-size", "cache_disk_bytes", self.cache_bytes)):
            if value is None:
                continue
            if not self.source.startswith(("s3://", "dir://")):
                raise ConfigError(f"{flag} applies to s3:// and dir:// sources only, not "
                                  f"{self.source[:200]}")
            out[key] = value
        return out

    # --- the worker channel -------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, enum.Enum):
                d[k] = v.value
        return d

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> ServeOptions:
        kinds = {"strategy": StrategyName, "then": Then, "engine": EngineName,
                 "on_bad_handshake": BadHandshakePolicy, "on_vm_failure": VmFailurePolicy}
        kw: dict[str, object] = {}
        for f in fields(cls):
            if f.name in doc:
                v = doc[f.name]
                if f.name in kinds:
                    v = kinds[f.name](v)
                elif isinstance(v, list):  # JSON has no tuples
                    v = tuple(v)
                kw[f.name] = v
        return cls(**kw)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> ServeOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
