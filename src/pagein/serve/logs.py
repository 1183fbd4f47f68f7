"""Log output for ``pagein`` and its serving workers: one format for every process.

``configure(level, fmt)`` sets it up in the supervisor; a worker calls it with the
level and format the supervisor sends it at start, so ``--log-format json`` gives one
JSON object per line from every process: ``time``, ``level``, ``logger``, ``message``,
and ``vm`` (the peer pid) and ``worker`` where known.

The ``pagein.serve.lifecycle`` logger (start-up, drain, stop, SIGHUP state) always logs
at INFO, whatever ``-v`` says: a service manager's journal must show what a server
serves and why it stopped, at the default level.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time

__all__ = ["LIFECYCLE", "LogFormat", "configure", "current_format"]

LIFECYCLE = "pagein.serve.lifecycle"
_MAX_MESSAGE = 8192  # characters of one log message (a traceback included)
_VM = re.compile(r"vm pid=(\d{1,10})\b")


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


_current = LogFormat.TEXT


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the VM is the ``vm pid=N`` the message names."""

    def __init__(self, worker: str | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name,
            "message": message[:_MAX_MESSAGE]}
        if (m := _VM.search(message)) is not None:
            doc["vm"] = int(m.group(1))
        if self.worker is not None:
            doc["worker"] = self.worker
        return json.dumps(doc)


def configure(level: int, fmt: LogFormat = LogFormat.TEXT, where: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt``; ``where`` names a worker process."""
    global _current
    _current = fmt
    handler = logging.StreamHandler()
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(where))
    else:
        tag = f"[{where}]" if where else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger(LIFECYCLE).setLevel(min(level, logging.INFO))


def current_format() -> LogFormat:
    """The format :func:`configure` set last (handed on to worker processes)."""
    return _current
