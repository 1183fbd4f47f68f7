"""A control socket for a running VM: snapshot it at any time from another process.

``pagein vm run --control PATH`` (or ``vm restore --control PATH``) listens on a Unix
stream socket. Each request is one JSON line, each answer one JSON line::

    -> {"op": "snapshot", "dir": "/snap/a", "resume": true, "diff": false}
    <- {"ok": true, "dir": "/snap/a", "memory_bytes": 67108864, "pause_ms": 41.7,
        "bytes_written": 67108864, "diff": false}
    -> {"op": "status"}
    <- {"ok": true, "active_vcpus": [0, 1], "console_output_bytes": 120}
    <- {"ok": false, "error": "..."}           on any failure, with the reason

A snapshot pauses every vCPU (:meth:`Machine.pause`), saves the state and the memory
(:func:`pagein.vmm.snapshot.save_snapshot`) and resumes the guest unless ``resume`` is
false. One request at a time: a second client waits for the first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from pagein.errors import PageinError
from pagein.sys.poll import wait_readable
from pagein.vmm.machine import Machine
from pagein.vmm.snapshot import save_snapshot

__all__ = ["ControlServer", "request"]

log = logging.getLogger("pagein.vmm")
_MAX_REQUEST = 64 * 1024


class ControlServer:
    """Serve control requests for ``machine`` on ``path`` in a background thread.

    ``workload`` is recorded in every snapshot so a restore knows what the guest runs.
    ``on_snapshot`` is called with each snapshot directory written (for logging).
    """

    def __init__(self, machine: Machine, path: str, *,
                 workload: tuple[str, tuple[int, ...]] | None = None,
                 on_snapshot: Callable[[str], None] | None = None) -> None:
        self.machine = machine
        self.path = path
        self.workload = workload
        self._on_snapshot = on_snapshot
        self._lock = threading.Lock()
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of an earlier run: nobody listens on it
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(path)
            self._sock.listen(4)
        except BaseException:
            self._sock.close()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name="pagein-control")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            ready = wait_readable([self._sock.fileno(), self._stop_r], None)
            if self._stop_r in ready:
                return
            conn, _ = self._sock.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True,
                             name="pagein-control-client").start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            while line := f.readline(_MAX_REQUEST):
                try:
                    answer = self.handle(json.loads(line))
                except (ValueError, PageinError, OSError, RuntimeError, TimeoutError) as e:
                    answer = {"ok": False, "error": str(e)}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    return

    def handle(self, req: Any) -> dict[str, Any]:
        """Answer one decoded request (also callable in-process)."""
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise ValueError('a request is a JSON object with "op": "snapshot" or "status"')
        with self._lock:
            if req["op"] == "status":
                return {"ok": True, "active_vcpus": sorted(self.machine.active_vcpus),
                        "console_output_bytes": len(self.machine.console.output())}
            if req["op"] != "snapshot":
                raise ValueError(f"unknown op {req['op']!r}: use snapshot or status")
            directory = req.get("dir")
            if not isinstance(directory, str) or not directory:
                raise ValueError('a snapshot request needs "dir": the directory to write')
            diff = req.get("diff", False)
            if not isinstance(diff, bool):
                raise ValueError('"diff" is true or false')
            return self._snapshot(directory, bool(req.get("resume", True)), diff)

    def _snapshot(self, directory: str, resume: bool, diff: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.machine.pause()
        try:
            snap = save_snapshot(self.machine, directory, workload=self.workload, diff=diff)
        finally:
            if resume:
                self.machine.resume()
        if self._on_snapshot is not None:
            self._on_snapshot(directory)
        return {"ok": True, "dir": directory, "memory_bytes": snap.memory_bytes,
                "pause_ms": round((time.perf_counter() - t0) * 1e3, 3),
                "bytes_written": snap.bytes_written, "diff": diff}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def request(path: str, req: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return the answer.

    Raises :class:`~pagein.errors.PageinError` when nobody listens there, when the VM
    answers with an error, or when no answer comes within ``timeout`` seconds.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise PageinError(f"the VM at control socket {path} closed the connection "
                                      "without answering (did it exit?)")
                buf += chunk
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise PageinError(f"no VM listens on control socket {path}: start one with "
                              "`pagein vm run --control PATH`") from e
        except TimeoutError as e:
            raise PageinError(f"the VM at control socket {path} did not answer within "
                              f"{timeout:g} s") from e
    answer = json.loads(buf)
    if not isinstance(answer, dict):
        raise PageinError(f"the VM at control socket {path} sent a malformed answer")
    if not answer.get("ok"):
        raise PageinError(f"the VM at control socket {path} refused: {answer.get('error')}")
    return answer
