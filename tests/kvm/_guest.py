"""Helpers shared by the KVM tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pagein.sys.kvm import VcpuState
from pagein.sys.poll import wait_readable
from pagein.vmm.image import workload_image
from pagein.vmm.machine import Machine
from pagein.vmm.workloads import WorkloadArgs, function_args


def park_function_at_ready(m: Machine, wa: WorkloadArgs, *, track_dirty: bool = False,
                           timeout: float = 60) -> None:
    """Boot ``function`` on ``m`` and pause it at READY (its state built, no request read);
    with ``track_dirty`` KVM logs its writes from the first instruction on."""
    if track_dirty:
        m.enable_dirty_tracking()
    m.pause_on_ready = True
    m.boot(workload_image("function"), wa.args, min_heap_bytes=wa.min_heap_bytes)
    m.start()
    assert m.ready.wait(timeout)
    m.pause(timeout=timeout)


def function_at_ready(state: int, seed: int, mem: int,
                      vcpus: int = 2) -> tuple[list[VcpuState], bytes]:
    """Boot ``function``, park it at READY, return its vCPU states and a copy of its RAM."""
    wa = function_args(state, seed)
    with Machine.create(mem, vcpus) as m:
        park_function_at_ready(m, wa)
        return m.vcpu_states(), m.memory.read(0, mem)


def pagein_vm(*args: str, stdin: str = "", timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    """``pagein vm ARGS`` as a user runs it, ``stdin`` on its console; never raises on
    a non-zero exit (the tests check the status and the message)."""
    return subprocess.run([sys.executable, "-m", "pagein", "vm", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def snapshot_at_ready(directory: Path, *, state: str, seed: int, mem: str = "32M",
                      vcpus: int = 1, requests: str = "checksum\n") -> None:
    """``pagein vm run --snapshot-at-ready DIR`` of a ``function`` guest, which then
    answers ``requests`` and exits 0."""
    res = pagein_vm("run", "--mem", mem, "--vcpus", str(vcpus), "--snapshot-at-ready",
                    str(directory), f"state={state}", f"seed={seed}", stdin=requests)
    assert res.returncode == 0, res.stderr


@contextlib.contextmanager
def ready_serve(argv: list[str], timeout: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """Start a handler (``argv`` + ``--ready-fd``: `pagein serve` or a wrapper of it) and
    wait until it listens. At the end, if it still runs, it is stopped as a service
    manager stops it (SIGTERM, SIGKILL after 10 s). Its stderr is a pipe the test may
    read; stdout is discarded."""
    r, w = os.pipe()
    proc = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        ready = wait_readable([r], timeout) and os.read(r, 16)
        assert ready, "the handler did not start listening"
        yield proc
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
