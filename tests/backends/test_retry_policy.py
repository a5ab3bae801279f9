"""Which storage errors are retried, and how the retry policy waits and gives up."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from torchstow import StorageFullError, StorageIOError
from torchstow.backends.fsspec.errors import CloudRetryPolicy as RetryPolicy
from torchstow.backends.fsspec.errors import describe_error, is_transient
from torchstow.spi import NotDurableError


class ClientError(Exception):
    """Shaped like botocore's ClientError (what s3fs raises from)."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }


class ServerDisconnectedError(Exception):
    """Named like aiohttp's."""


class HttpError(Exception):
    """Shaped like gcsfs's HttpError."""

    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code


def _translated(cause: BaseException, exc: BaseException) -> BaseException:
    """What s3fs does: a Python exception raised from the service error."""
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        ClientError("SlowDown", 503),
        ClientError("InternalError", 500),
        ClientError("Throttling", 400),
        ClientError("RequestTimeout", 400),
        _translated(ClientError("ServiceUnavailable", 503), OSError(errno.EIO, "ServiceUnavailable")),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        TimeoutError("read timed out"),
        OSError(errno.EPIPE, "broken pipe"),
        ServerDisconnectedError("Server disconnected"),
        HttpError(429),
        HttpError(502),
    ],
    ids=repr,
)
def test_transient_errors(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        _translated(ClientError("AccessDenied", 403), PermissionError("Access Denied")),
        ClientError("NoSuchBucket", 404),
        ClientError("InvalidArgument", 400),
        FileNotFoundError("bucket/key"),
        HttpError(401),
        ValueError("a bug, not the network"),
    ],
    ids=repr,
)
def test_permanent_errors(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_describe_names_the_service_code_and_status() -> None:
    exc = _translated(ClientError("AccessDenied", 403), PermissionError("Access Denied"))
    assert describe_error(exc) == "AccessDenied (HTTP 403): AccessDenied happened"
    assert describe_error(ConnectionResetError("reset")) == "ConnectionResetError: reset"


class Flaky:
    def __init__(self, failures: list[BaseException], result: Any = "ok") -> None:
        self.failures = failures
        self.calls = 0
        self.result = result

    def __call__(self) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_transient_failures_are_retried_with_growing_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("torchstow.core.storage.retry.time.sleep", waits.append)
    fn = Flaky([ClientError("SlowDown", 503), ConnectionResetError(), TimeoutError()])
    assert RetryPolicy(attempts=4, base_delay=1.0, max_delay=3.0).call(fn, "reading x") == "ok"
    assert fn.calls == 4
    assert 0.5 <= waits[0] <= 1.0
    assert 1.0 <= waits[1] <= 2.0
    assert 1.5 <= waits[2] <= 3.0  # capped at max_delay


def test_giving_up_names_the_operation_and_the_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torchstow.core.storage.retry.time.sleep", lambda _: None)
    fn = Flaky([ClientError("SlowDown", 503)] * 5)
    with pytest.raises(
        StorageIOError, match=r"reading s3://b/k failed after 3 attempt\(s\).*SlowDown"
    ) as caught:
        RetryPolicy(attempts=3).call(fn, "reading s3://b/k")
    assert fn.calls == 3
    assert caught.value.transient
    assert isinstance(caught.value.__cause__, ClientError)


def test_permanent_errors_fail_at_once_and_missing_objects_stay_file_not_found() -> None:
    denied = Flaky([_translated(ClientError("AccessDenied", 403), PermissionError("Access Denied"))])
    with pytest.raises(
        StorageIOError, match=r"writing s3://b/k failed: AccessDenied \(HTTP 403\).*not retried"
    ):
        RetryPolicy().call(denied, "writing s3://b/k")
    assert denied.calls == 1
    missing = Flaky([FileNotFoundError("b/k")])
    with pytest.raises(FileNotFoundError) as caught:
        RetryPolicy().call(missing, "reading s3://b/k")
    assert not isinstance(caught.value, StorageIOError)
    bug = Flaky([TypeError("not a storage error")])
    with pytest.raises(TypeError):
        RetryPolicy().call(bug, "reading")


def test_coroutines_are_retried_too() -> None:
    fn = Flaky([ServerDisconnectedError(), ClientError("InternalError", 500)], result=b"bytes")

    async def request() -> Any:
        return fn()

    assert asyncio.run(RetryPolicy(base_delay=0.0).acall(request, "reading")) == b"bytes"
    assert fn.calls == 3


def test_a_policy_needs_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    "exc",
    [
        StorageFullError("no space left writing data-0.bin"),
        NotDurableError("manifest.json is in place, but syncing its directory failed"),
        FileExistsError("b/manifest.json exists"),  # publish_new's refusal, raised by the request
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_a_store_raised_to_say_something_comes_out_as_it_is(exc: BaseException) -> None:
    # Before: each became a plain StorageIOError ("... (a permanent error, not retried)"), so a
    # full store lost its type, a sync failure counted as a commit, a refusal as an I/O error.
    fn = Flaky([exc])
    with pytest.raises(type(exc)) as caught:
        RetryPolicy().call(fn, "writing s3://b/k")
    assert caught.value is exc and fn.calls == 1


def test_a_storage_error_marked_transient_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torchstow.core.storage.retry.time.sleep", lambda _: None)
    fn = Flaky([StorageIOError("the link dropped", transient=True)])
    assert RetryPolicy(attempts=2).call(fn, "reading s3://b/k") == "ok"
    assert fn.calls == 2
