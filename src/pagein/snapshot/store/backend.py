"""Where store objects live: a local directory, or an S3-compatible bucket.

Both backends speak the same five verbs over flat keys (``chunks/ab/ab12…``,
``manifests/NAME.json``): ``get`` (None when absent), ``put`` (atomic: readers see the
old object or the whole new one), ``head``, ``delete`` and ``list``. Object
modification times come from the store itself (file mtime, S3 ``LastModified``), so
gc compares times on one clock even when clients' clocks drift.

The S3 backend uses boto3 configured the standard way: the endpoint from the
``endpoint_url`` option or ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
credentials from the environment, a profile (``AWS_PROFILE`` or the ``profile``
option) or the instance role. Transient failures (connection refused or reset,
timeouts, 5xx, throttling) are retried with exponential backoff and jitter, a
bounded number of times; then one :class:`~pagein.errors.SourceError` says which
endpoint could not be reached and what to check.
"""

from __future__ import annotations

import abc
import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pagein.errors import SourceError

__all__ = ["Backend", "LocalBackend", "ObjectInfo", "RetryPolicy", "S3Backend"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: key, size in bytes, modification time (store clock, Unix s)."""

    key: str
    size_bytes: int
    mtime: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a transient store failure."""

    attempts: int = 5
    first_delay: float = 0.05
    max_delay: float = 1.0


class Backend(abc.ABC):
    """Flat key → bytes object storage; every method is safe to call from many threads."""

    #: Where the store lives, for messages (``dir:///srv/store``, ``s3://bucket/prefix``).
    url: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """Return the object's bytes, or None when no such object exists."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing any previous object)."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None when it does not exist."""

    @abc.abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete the objects; keys that do not exist are ignored."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


class LocalBackend(Backend):
    """Objects as files under one directory; puts write a temp file and rename it."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root)
        self.url = f"dir://{self.root.absolute()}"
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise SourceError(f"store directory {self.root} does not exist: create it with "
                              "'pagein store push' or fix the dir:// path")

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SourceError(f"reading {self._path(key)} failed: {e}") from e

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A reader (another host's pull, gc) must never see half an object: write a
        # temp file in the same directory, then rename over the final name.
        tmp = path.parent / f".tmp.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SourceError(f"writing {path} failed: {e}; check free space and "
                              "permissions of the store directory") from e

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        top, _, _ = prefix.rpartition("/")
        base = self.root / top if top else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.startswith(".tmp."):
                    continue
                full = Path(dirpath) / fn
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)


#: After giving up on an unreachable store, fail further calls at once for this long.
DOWN_HOLD_SECONDS = 1.0

_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable",
                    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeoutException", "InternalServerError"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                     "ExpiredToken", "InvalidToken", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Backend(Backend):
    """Objects in an S3-compatible bucket under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 profile: str | None = None, region: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), max_connections: int = 16,
                 connect_timeout: float = 2.0, read_timeout: float = 20.0) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.retry = retry
        from botocore.exceptions import ProfileNotFound

        try:
            session = boto3.session.Session(profile_name=profile)
        except ProfileNotFound as e:
            raise SourceError(f"AWS profile {profile!r} is not configured ({e}): add it to "
                              "~/.aws/credentials, or give AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY instead") from e
        # Retries are ours (below) so that "unreachable" is decided once, with a
        # message; botocore's own retry loop would multiply the attempts.
        config = Config(retries={"max_attempts": 1, "mode": "standard"},
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        max_pool_connections=max_connections,
                        s3={"addressing_style": "path"})
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url or None,
            region_name=region or session.region_name or "us-east-1", config=config)
        self.endpoint: str = str(self._client.meta.endpoint_url)
        self._lock = threading.Lock()
        # After the store was declared unreachable, calls fail at once for a moment
        # instead of each running its own retry loop (a restore has many threads).
        self._down_until = 0.0
        self._down_message = ""

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        started = time.monotonic()
        if started < self._down_until:
            raise SourceError(self._down_message)
        delay = self.retry.first_delay
        last: Exception | None = None
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in _CREDENTIAL_CODES:
                    raise SourceError(
                        f"S3 store {self.endpoint} refused {op} s3://{self.bucket}/"
                        f"{self._key(key)} ({code}): check AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from e
                if code == "NoSuchBucket":
                    raise SourceError(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}: create "
                        "it or fix the s3:// URL") from e
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code not in _TRANSIENT_CODES and status < 500:
                    raise SourceError(f"S3 {op} s3://{self.bucket}/{self._key(key)} at "
                                      f"{self.endpoint} failed: {e}") from e
                last = e
            except (NoCredentialsError, PartialCredentialsError) as e:
                # Not the network: botocore found no (or half a) key pair to sign with.
                raise SourceError(
                    f"no AWS credentials to sign {op} s3://{self.bucket}/{self._key(key)} "
                    f"at {self.endpoint} ({e}): give them with AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or a profile (AWS_PROFILE or --profile NAME, "
                    "from ~/.aws/credentials)") from e
            except BotoCoreError as e:  # connection refused/reset, timeouts, DNS
                last = e
            if attempt < self.retry.attempts:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.retry.max_delay)
        elapsed = time.monotonic() - started
        message = (f"S3 store {self.endpoint} is unreachable: {op} s3://{self.bucket}/"
                   f"{self._key(key)} failed {self.retry.attempts} times in {elapsed:.1f} s "
                   f"({last}); check --endpoint-url / AWS_ENDPOINT_URL, that the store is "
                   "running, and the network")
        with self._lock:
            self._down_until = time.monotonic() + DOWN_HOLD_SECONDS
            self._down_message = message
        raise SourceError(message) from last

    @staticmethod
    def _is_missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return (isinstance(e, ClientError)
                and str(e.response.get("Error", {}).get("Code", "")) in _MISSING_CODES)

    def get(self, key: str) -> bytes | None:
        def op() -> bytes | None:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as e:
                if self._is_missing(e):
                    return None
                raise
            body: bytes = resp["Body"].read()
            return body

        return self._call("GET", key, op)

    def put(self, key: str, data: bytes) -> None:
        self._call("PUT", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data))

    def head(self, key: str) -> ObjectInfo | None:
        def op() -> ObjectInfo | None:
            try:
                r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as e:
                if self._is_missing(e):
                    return None
                raise
            return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp())

        return self._call("HEAD", key, op)

    def delete(self, keys: list[str]) -> None:
        def delete_batch(batch: list[dict[str, str]]) -> Callable[[], object]:
            return lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self._call("DELETE", keys[start], delete_batch(batch))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            resp: dict[str, Any] = self._call(
                "LIST", prefix, functools.partial(self._client.list_objects_v2, **kwargs))
            for obj in resp.get("Contents", []):
                key = str(obj["Key"])[len(self.prefix):]
                yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
