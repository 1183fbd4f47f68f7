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

from pagein.serve.access import DEFAULT_SOCKET_MODE, GROUP_SOCKET_MODE, Access
from pagein.serve.engine import EngineName
from pagein.serve.strategies import DEFAULT_READAHEAD_BYTES, StrategyName, Then

__all__ = ["BadHandshakePolicy", "ServeOptions", "VmFailurePolicy", "default_workers"]

DEFAULT_CHUNK_BYTES = 1 << 20


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
    exit_after: int | None = None  # stop once this many VM sessions have ended
    engine: EngineName = field(default_factory=EngineName.default)
    workers: int | None = None  # worker processes; None: one per CPU; 0: in this process
    max_restarts: int = 3  # worker crashes a VM survives before its session fails
    on_vm_failure: VmFailurePolicy = VmFailurePolicy.KILL
    socket_mode: int | None = None  # None: 0600, or 0660 with socket_group
    socket_group: int | None = None  # gid of the socket file (None: the server's own)
    allow_uids: tuple[int, ...] = ()  # served besides root and the server's own uid
    allow_gids: tuple[int, ...] = ()  # served by the gid they connect with
    page_cache_keep: float = 60.0  # seconds a page cache no VM uses is kept (--share-pages)

    def __post_init__(self) -> None:
        if self.socket_mode is not None and not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"--socket-mode {self.socket_mode:o} is not a permission mode "
                             "between 0 and 777 (octal), e.g. 0660")
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
    def trace_path(self) -> str | None:
        """Where a VM's trace goes: --trace, or FILE.trace.json next to --record FILE."""
        return self.trace or (f"{self.record}.trace.json" if self.record else None)

    # --- the command line -----------------------------------------------------------

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServeOptions:
        """Build from ``pagein serve``'s parsed flags."""
        return cls(
            socket_path=args.socket, source=args.mem_file or args.source,
            strategy=StrategyName(args.strategy), readahead_bytes=args.readahead_size,
            working_set=args.working_set, then=Then(args.then), record=args.record,
            trace=args.trace, chunk_bytes=args.chunk_size,
            on_bad_handshake=BadHandshakePolicy(args.on_bad_handshake),
            handshake_timeout=args.handshake_timeout, stats_json=args.stats_json,
            metrics_port=args.metrics_port, exit_after=args.exit_after,
            engine=EngineName(args.engine), workers=args.workers,
            max_restarts=args.max_restarts, on_vm_failure=VmFailurePolicy(args.on_vm_failure),
            socket_mode=args.socket_mode, socket_group=args.socket_group,
            allow_uids=tuple(dict.fromkeys(i for ids in args.allow_uid or () for i in ids)),
            allow_gids=tuple(dict.fromkeys(i for ids in args.allow_gid or () for i in ids)),
            page_cache_keep=args.page_cache_keep)

    def to_argv(self) -> list[str]:
        """The ``pagein serve ...`` arguments that parse back into these options."""
        argv = ["serve", "--socket", self.socket_path, "--source", self.source,
                "--strategy", self.strategy.value, "--readahead-size", str(self.readahead_bytes),
                "--then", self.then.value, "--chunk-size", str(self.chunk_bytes),
                "--on-bad-handshake", self.on_bad_handshake.value,
                "--handshake-timeout", repr(self.handshake_timeout),
                "--engine", self.engine.value, "--max-restarts", str(self.max_restarts),
                "--on-vm-failure", self.on_vm_failure.value,
                "--page-cache-keep", repr(self.page_cache_keep)]
        for flag, value in (("--working-set", self.working_set), ("--record", self.record),
                            ("--trace", self.trace), ("--stats-json", self.stats_json),
                            ("--metrics-port", self.metrics_port),
                            ("--exit-after", self.exit_after), ("--workers", self.workers),
                            ("--socket-group", self.socket_group)):
            if value is not None:
                argv += [flag, str(value)]
        if self.socket_mode is not None:
            argv += ["--socket-mode", f"{self.socket_mode:04o}"]
        for flag, ids in (("--allow-uid", self.allow_uids), ("--allow-gid", self.allow_gids)):
            if ids:
                argv += [flag, ",".join(str(i) for i in ids)]
        return argv

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
