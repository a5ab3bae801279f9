"""Helpers of the backend tests (importable by name; fixtures live in conftest.py)."""

from __future__ import annotations

import uuid
from typing import Any

from dist_pool import free_port

__all__ = ["S3_CREDENTIALS", "free_port", "s3_options", "unique"]

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """Storage options for the moto server: fast retries, and parts of S3's smallest size
    for every data file over 5 MiB, so small tests exercise multipart uploads."""
    small_parts = {"part_size": 5 << 20, "multipart_threshold": 5 << 20}
    return {**S3_CREDENTIALS, "endpoint_url": endpoint, "retry_delay": 0.01, **small_parts, **extra}


def unique(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
