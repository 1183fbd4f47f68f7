"""S3 backend error classification with a scripted client: retry, give up once, don't retry."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pagein.errors import SourceError
from pagein.snapshot.store.backend import LocalBackend, RetryPolicy, S3Backend


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


class ScriptedClient:
    """Raises the scripted exceptions in order, then answers."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def get_object(self, **_: Any) -> dict[str, Any]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {"Body": _Body(b"payload")}

    def close(self) -> None:
        pass


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return S3Backend("bkt", "pre", endpoint_url="http://127.0.0.1:9",
                     retry=RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.002))


def test_transient_errors_are_retried(backend: S3Backend) -> None:
    client = ScriptedClient(client_error("SlowDown", 503), client_error("Weird", 502))
    backend._client = client
    assert backend.get("chunks/x") == b"payload"
    assert client.calls == 3


def test_unreachable_gives_one_error_after_bounded_attempts(backend: S3Backend) -> None:
    client = ScriptedClient(*[EndpointConnectionError(endpoint_url="http://127.0.0.1:9")] * 5)
    backend._client = client
    with pytest.raises(SourceError) as info:
        backend.get("chunks/x")
    assert client.calls == 3
    msg = str(info.value)
    assert "S3 store http://127.0.0.1:9 is unreachable" in msg
    assert "s3://bkt/pre/chunks/x failed 3 times" in msg and "AWS_ENDPOINT_URL" in msg
    # Right after, other calls fail at once with the same message (no new retry loop).
    with pytest.raises(SourceError, match="is unreachable"):
        backend.get("chunks/y")
    assert client.calls == 3


@pytest.mark.parametrize(("code", "status", "expect"), [
    ("AccessDenied", 403, "AWS_ACCESS_KEY_ID"),
    ("NoSuchBucket", 404, "bucket 'bkt' does not exist"),
    ("InvalidRange", 416, "failed"),
])
def test_permanent_errors_are_not_retried(backend: S3Backend, code: str, status: int,
                                          expect: str) -> None:
    client = ScriptedClient(client_error(code, status))
    backend._client = client
    with pytest.raises(SourceError, match=expect):
        backend.get("k")
    assert client.calls == 1


def test_missing_key_is_none(backend: S3Backend) -> None:
    backend._client = ScriptedClient(client_error("NoSuchKey", 404))
    assert backend.get("k") is None


def test_local_backend_put_is_atomic_and_lists(tmp_path: Any) -> None:
    b = LocalBackend(tmp_path / "s", create=True)
    b.put("a/b/c", b"1")
    b.put("a/b/c", b"22")
    b.put("a/d", b"333")
    assert b.get("a/b/c") == b"22" and b.get("nope") is None
    assert sorted((o.key, o.size_bytes) for o in b.list("a/")) == [("a/b/c", 2), ("a/d", 3)]
    assert not list((tmp_path / "s").rglob(".tmp.*"))
    b.delete(["a/d", "missing"])
    assert [o.key for o in b.list("")] == ["a/b/c"]
    with pytest.raises(SourceError, match="does not exist"):
        LocalBackend(tmp_path / "absent")
