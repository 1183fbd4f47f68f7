"""Fixtures for the S3 store tests: a SeaweedFS server for the session (see seaweed_server)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from seaweed_server import ACCESS_KEY, SECRET_KEY, Weed, s3_client, start_weed


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """Standard AWS environment for the tests: loopback credentials, no config files, no IMDS."""
    keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
    saved = {k: os.environ.get(k) for k in keys}
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def weed_server(s3_env: dict[str, str]) -> Iterator[Weed]:
    workdir = Path(tempfile.mkdtemp(prefix="pagein-weed-"))
    server = start_weed(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3(weed_server: Weed) -> Any:
    """A boto3 client for the session server (to inspect or damage objects directly)."""
    return s3_client(weed_server.endpoint)
