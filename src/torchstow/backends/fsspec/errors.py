"""What the client libraries under fsspec raise, for the retry policy: botocore's service
errors (S3 and its kin), the connection failures of botocore, aiohttp and http.client,
and fsspec's own timeout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchstow.spi import ErrorRules, RetryPolicy

__all__ = [
    "CLOUD_RULES",
    "CloudRetryPolicy",
    "describe_error",
    "error_status",
    "is_throttling",
    "is_transient",
]


def _read_botocore(exc: BaseException) -> tuple[int | None, str | None, str]:
    """Status, code and message of a botocore ``ClientError`` (what s3fs raises from)."""
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    error = response.get("Error", {})
    return (status if isinstance(status, int) else None), error.get("Code"), error.get("Message") or ""


_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
    }
)

CLOUD_RULES = ErrorRules(
    transient_codes=_THROTTLING_CODES
    | frozenset(
        {
            "RequestTimeout",
            "RequestTimeoutException",
            "InternalError",
            "ServiceUnavailable",
            "ServiceUnavailableException",
        }
    ),
    # Connection-level failures of the HTTP stacks fsspec implementations use
    # (botocore, aiohttp, http.client) and fsspec's own, by class name.
    transient_classes=frozenset(
        {
            "HTTPClientError",
            "ConnectionClosedError",
            "EndpointConnectionError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "IncompleteReadError",
            "ResponseStreamingError",
            "ServerDisconnectedError",
            "ClientConnectionError",
            "ClientOSError",
            "ClientPayloadError",
            "ServerTimeoutError",
            "IncompleteRead",
            "RemoteDisconnected",
            "FSTimeoutError",
        }
    ),
    read_status=_read_botocore,
)


@dataclass(frozen=True)
class CloudRetryPolicy(RetryPolicy):
    """The retry policy of fsspec stores: :class:`RetryPolicy` with :data:`CLOUD_RULES`."""

    rules: ErrorRules = CLOUD_RULES


is_transient = CLOUD_RULES.is_transient
describe_error = CLOUD_RULES.describe
error_status = CLOUD_RULES.status


def is_throttling(exc: BaseException) -> bool:
    """Whether the store refused a request as one too many (503 SlowDown, 429 and kin)."""
    status, code = error_status(exc)
    return code in _THROTTLING_CODES or status in (429, 503)
